//! Writes the proteins the model would see, as FASTA (`>id` then residues), in output-index order.
//!
//! ```text
//! cargo run --release -p virnuc-data --example translate -- [--chunk 500] [--compat] [--protein] FILE...
//! ```
//! The `virnuc-trt translate` subcommand does the same through [`virnuc_data::proteins`].

use std::io::Write;

use virnuc_data::{Mode, PipelineConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = PipelineConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--chunk" => config.chunk_len = args.next().ok_or("--chunk needs a value")?.parse()?,
            "--compat" => config.virnucpro_compat = true,
            "--protein" => config.mode = Mode::Protein,
            _ => config.inputs.push(a.into()),
        }
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for p in virnuc_data::proteins(&config)? {
        let p = p?;
        writeln!(out, ">{}\n{}", p.id, p.residues)?;
    }
    Ok(())
}
