//! `virnuc-trt translate`: the proteins `embed` would send to an ESM-2 model, or with `--dna` the DNA
//! spans it would send to a DNA model (DNABERT-S), as FASTA.
//!
//! Same chunking, translation, frame filter, long-sequence policy, names and order as `embed`
//! (both go through virnuc-data), so tests can feed exactly these sequences to a reference model.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use virnuc_data::PipelineConfig;

use crate::settings::{DataArgs, check_data_ranges, usage};

/// Flags of `virnuc-trt translate`.
#[derive(Debug, Clone, Args)]
pub struct TranslateArgs {
    /// FASTA/FASTQ files (plain, .gz, .zst, .bz2); `-` reads standard input.
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output FASTA (default: standard output). Written to a temp file and renamed.
    #[arg(long, short = 'o', value_name = "FILE.fa")]
    pub out: Option<PathBuf>,
    /// Write each kept frame's DNA span (what a DNABERT-S model embeds: VirNucPro's span with
    /// --virnucpro-compat, else the coded bases) instead of its protein; nucleotide mode only.
    #[arg(long)]
    pub dna: bool,
}

pub fn run(args: &TranslateArgs) -> Result<()> {
    let config = PipelineConfig {
        inputs: args.inputs.clone(),
        mode: args.data.mode.unwrap_or_default(),
        force_mode: args.data.force_mode,
        chunk_len: args.data.chunk.unwrap_or(500),
        virnucpro_compat: args.data.virnucpro_compat,
        max_residues: args.data.max_residues.unwrap_or(1022),
        long: args.data.long.unwrap_or_default(),
        ..PipelineConfig::default()
    };
    check_data_ranges(config.chunk_len, config.max_residues)?;
    if args.dna && config.mode != virnuc_data::Mode::Nucleotide {
        return usage("--dna writes the DNA spans of kept frames: nucleotide mode only");
    }
    if args.dna && config.long == virnuc_data::LongPolicy::Split {
        return usage("--dna takes each frame's DNA whole: --long split does not apply");
    }
    crate::settings::warn_all(&crate::settings::data_flags_ineffective(
        config.mode,
        args.data.chunk.is_some(),
        args.data.virnucpro_compat,
    ));
    let mut proteins = virnuc_data::proteins(&config).context("cannot read the input")?;
    let mut text = Vec::new();
    let mut write = |w: &mut dyn Write| -> Result<u64> {
        let mut n = 0;
        for p in proteins.by_ref() {
            let p = p.map_err(|e| anyhow!(e))?;
            let seq = if args.dna { &p.dna } else { &p.residues };
            writeln!(w, ">{}\n{seq}", p.id)?;
            n += 1;
        }
        w.flush()?;
        crate::embed::print_alterations(&proteins.report(&config));
        Ok(n)
    };
    match &args.out {
        None => {
            let stdout = std::io::stdout();
            let mut w = BufWriter::new(stdout.lock());
            write(&mut w)?;
        }
        Some(path) => {
            let n = write(&mut text)?;
            crate::embed::write_atomic(path, &text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("virnuc-trt: wrote {n} proteins to {}", path.display());
        }
    }
    Ok(())
}
