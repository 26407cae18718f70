//! `virnuc-trt gate`: the accuracy gate for CI (see `docs/engines.md`). The work is
//! `virnuc_gate::run_gate`; this is its command line. Exit status 0 on pass, 1 on fail, 2 on a
//! usage error, 3 and above when the gate could not run (see `exit.rs`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use virnuc_data::Mode;
use virnuc_engine::Ep;
use virnuc_gate::{GateOptions, Thresholds, run_gate};

use crate::settings::{MAX_DEVICE, Machine, check_data_ranges, check_range, max_toks_per_batch};

#[derive(Debug, Args)]
pub struct GateArgs {
    /// The engine under test (a `virnuc-trt build` folder; a model export also works).
    #[arg(long, value_name = "DIR")]
    pub candidate: PathBuf,
    /// What it must match: an engine folder or a model export (typically the fp32 one).
    #[arg(long, value_name = "DIR|MODEL")]
    pub reference: PathBuf,
    /// FASTA/FASTQ input to sample sequences from.
    #[arg(long, required = true, num_args = 1.., value_name = "FASTA")]
    pub input: Vec<PathBuf>,
    /// Sequences compared (the first ones of the input).
    #[arg(long, default_value_t = 200)]
    pub sample: usize,
    /// What the input holds.
    #[arg(long, default_value = "nucleotide")]
    pub mode: Mode,
    /// Nucleotide chunk length (VirNucPro: 300 or 500).
    #[arg(long, default_value_t = 500)]
    pub chunk: usize,
    /// Thresholds YAML (`min_cosine`, `mean_cosine`, `max_abs_token_diff`, `min_sequences`).
    /// [default: min_cosine 0.99, mean_cosine 0.999]
    #[arg(long, value_name = "FILE.yaml")]
    pub thresholds: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
    /// Provider for a side given as a model export. [default: the candidate engine's]
    #[arg(long)]
    pub ep: Option<Ep>,
    /// GPU index. [default: the engine's]
    #[arg(long)]
    pub device: Option<i32>,
    /// Tokens per pack. [default: the candidate engine's tuned budget]
    #[arg(long)]
    pub toks_per_batch: Option<usize>,
    /// Run engines built for another GPU or runtime.
    #[arg(long)]
    pub force: bool,
    /// Do not compare per-token states even when both graphs output them.
    #[arg(long)]
    pub no_per_token: bool,
    /// The ONNX Runtime shared library.
    #[arg(long, env = "ORT_DYLIB_PATH", value_name = "FILE")]
    pub ort_lib: Option<PathBuf>,
}

/// A failed gate (exit status 1, after the report is printed).
#[derive(Debug)]
pub struct GateFailed(pub String);

impl std::fmt::Display for GateFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gate failed: {}", self.0)
    }
}

impl std::error::Error for GateFailed {}

/// Most sequences a gate compares: it keeps both sides' embeddings in memory.
const MAX_SAMPLE: usize = 1_000_000;

/// The numeric flags against their ranges, before any work.
fn check_ranges(args: &GateArgs) -> anyhow::Result<()> {
    let m = Machine::this();
    check_range("--sample", args.sample, 1, MAX_SAMPLE, "sequences compared")?;
    check_data_ranges(args.chunk, 1022)?;
    if let Some(b) = args.toks_per_batch {
        let why = "tokens: one residue with <cls> and <eos>, up to what the memory holds";
        check_range("--toks-per-batch", b, 3, max_toks_per_batch(&m), why)?;
    }
    if let Some(d) = args.device {
        check_range("--device", d, 0, MAX_DEVICE, "GPU index")?;
    }
    Ok(())
}

pub fn run(args: &GateArgs) -> anyhow::Result<()> {
    check_ranges(args)?;
    let thresholds = match &args.thresholds {
        Some(p) => Thresholds::from_yaml_file(p)?,
        None => Thresholds::default(),
    };
    let mut o = GateOptions::new(&args.candidate, &args.reference, args.input[0].clone());
    o.inputs = args.input.clone();
    o.sample = args.sample;
    o.mode = args.mode;
    o.chunk_len = args.chunk;
    o.thresholds = thresholds;
    o.ort_lib = args.ort_lib.clone();
    o.ep = args.ep;
    o.device_id = args.device;
    o.token_budget = args.toks_per_batch;
    o.force = args.force;
    o.per_token = !args.no_per_token;
    let report = run_gate(&o).with_context(|| {
        format!(
            "gate of {} against {}",
            args.candidate.display(),
            args.reference.display()
        )
    })?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write the JSON report {}", path.display()))?;
    }
    print!("{}", report.text());
    if report.pass {
        Ok(())
    } else {
        Err(GateFailed(report.failures.join("; ")).into())
    }
}
