//! Token ids of DNA sequences through the runtime's DNABERT-S encoder, for comparison with Python.
//!
//! `cargo run --example bpe_ids -- tokenizer.json < sequences.txt`: one sequence a line (an empty
//! line is an empty sequence), one line of space-separated ids out per sequence.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use virnuc_core::ModelFamily;
use virnuc_data::Encoder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: bpe_ids TOKENIZER_JSON < sequences")?;
    let encoder = Encoder::with_tokenizer_file(ModelFamily::DnabertS, Path::new(&path))?;
    let stdin = std::io::stdin();
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut ids = Vec::new();
    for line in stdin.lock().split(b'\n') {
        let line = line?;
        ids.clear();
        encoder.encode(&line, &mut ids)?;
        let text: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "{}", text.join(" "))?;
    }
    out.flush()?;
    Ok(())
}
