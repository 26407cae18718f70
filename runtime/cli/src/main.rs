//! `virnuc-trt`: ESM-2 embeddings of sequencing data through packed ONNX graphs on ONNX Runtime.
//!
//! ```text
//! virnuc-trt embed reads.fa --model out/esm2_t36_3B --out embeddings.h5      # FASTA → HDF5
//! virnuc-trt translate contigs.fa --chunk 500 -o proteins.fa                 # what embed would send
//! ```
//!
//! Exit status: 0 success (also when the reader of standard output goes away), 1 failure,
//! 2 usage error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod build_cmd;
mod embed;
mod gate_cmd;
mod settings;
mod translate;

/// ESM-2 protein-language-model embeddings of FASTA/FASTQ files at GPU speed: packed sequences
/// (no padding), ONNX Runtime (CPU, CUDA, TensorRT), HDF5 output.
#[derive(Debug, Parser)]
#[command(name = "virnuc-trt", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Embed sequences: FASTA/FASTQ in, HDF5 out (`sequence_ids`, `embeddings [N, H]`, `lengths`,
    /// input order), with a JSON run report.
    ///
    /// Nucleotide inputs go through VirNucPro's preparation (chunks of --chunk bp, six frames,
    /// stop-free frames kept, named `<id>_chunk_<n>F1` …). Any setting can also come from a YAML run
    /// config (--config run.yaml) using the long flag names with `_` (e.g. `toks_per_batch: 16384`,
    /// `inputs: [a.fa, b.fa]`); flags win over the file.
    Embed(Box<settings::EmbedArgs>),
    /// Write the proteins `embed` would send to the model (same names and order) as FASTA.
    Translate(translate::TranslateArgs),
    /// Build an engine folder for this GPU (or CPU): optimized graph, tuned token budget, manifest.
    Build(Box<build_cmd::BuildArgs>),
    /// Accuracy gate: a candidate engine's embeddings against a reference; exit 0 pass, 1 fail.
    Gate(Box<gate_cmd::GateArgs>),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and exit 0; real usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match &cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Translate(args) => translate::run(args),
        Command::Build(args) => build_cmd::run(args),
        Command::Gate(args) => gate_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virnuc-trt: error: {e:#}");
            if e.downcast_ref::<settings::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The reader of our standard output went away (`| head`): not a failure (ripgrep does the same).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
