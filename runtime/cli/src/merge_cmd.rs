//! `virnuc-trt merge`: the outputs of `embed --input-shard I/N`, or the prediction_scores.h5 of
//! `predict --input-shard I/N` (all N of them), joined into the file one run over the whole input
//! writes, in input order, in bounded memory. `virnuc-trt results` then writes VirNucPro's files
//! from merged predict scores.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use virnuc_output::{DEFAULT_BLOCK_ROWS, merge_outputs};

/// Flags of `virnuc-trt merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The parts, any order: the `--out` files of `embed --input-shard I/N`, or the
    /// prediction_scores.h5 files of `predict --input-shard I/N`, for every I of one N.
    #[arg(value_name = "PART.h5", required = true)]
    pub parts: Vec<PathBuf>,
    /// The merged file (refused if it exists; written under a temporary name, then renamed).
    #[arg(long, short = 'o', value_name = "ALL.h5")]
    pub out: PathBuf,
    /// Rows read from each part at a time: memory is about parts × rows × (hidden size × element
    /// size), whatever the number of rows in the parts.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BLOCK_ROWS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub block_rows: u64,
}

pub fn run(args: &MergeArgs) -> Result<()> {
    let summary = merge_outputs(&args.parts, &args.out, args.block_rows as usize)
        .with_context(|| format!("cannot merge into {}", args.out.display()))?;
    eprintln!(
        "virnuc-trt: merged {} parts ({} shards) into {}: {} sequences in input order",
        summary.parts,
        summary.shards,
        summary.path.display(),
        summary.sequences
    );
    Ok(())
}
