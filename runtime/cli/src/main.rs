//! `virnuc-trt`: ESM-2 embeddings of sequencing data through packed ONNX graphs on ONNX Runtime.
//!
//! ```text
//! virnuc-trt embed reads.fa --model out/esm2_t36_3B --out embeddings.h5      # FASTA → HDF5
//! virnuc-trt translate contigs.fa --chunk 500 -o proteins.fa                 # what embed would send
//! virnuc-trt merge part0.h5 part1.h5 part2.h5 -o all.h5                     # join --input-shard runs
//! virnuc-trt results reads.fa --scores all/prediction_scores.h5 --out-dir all  # VirNucPro's files
//! ```
//!
//! Exit status (every subcommand; see [`exit`] and docs/failures.md): 0 success, 1 `gate` failed,
//! 2 usage, 3 input, 4 output, 5 model/engine, 6 other error, 130/143 SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod build_cmd;
mod devices;
mod embed;
mod exit;
mod gate_cmd;
mod merge_cmd;
mod predict;
mod results_cmd;
mod settings;
mod translate;

/// ESM-2 protein-language-model embeddings of FASTA/FASTQ files at GPU speed: packed sequences
/// (no padding), ONNX Runtime (CPU, CUDA, TensorRT), HDF5 output.
#[derive(Debug, Parser)]
#[command(
    name = "virnuc-trt",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = EXIT_STATUS
)]
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
    #[command(after_help = EXIT_STATUS)]
    Embed(Box<settings::EmbedArgs>),
    /// VirNucPro's viral predictions end to end: DNA in; each stop-free frame through DNABERT-S and
    /// ESM-2 and VirNucPro's classifier; VirNucPro's prediction_results.txt and
    /// prediction_results_highestscore.csv out, plus a verdict per input record.
    ///
    /// VirNucPro's chunking and translation by default (its classifier was trained on them). Any
    /// setting can also come from a YAML run config (--config run.yaml, long flag names with `_`).
    #[command(after_help = EXIT_STATUS)]
    Predict(Box<predict::PredictArgs>),
    /// Write the proteins `embed` would send to the model (same names and order) as FASTA.
    #[command(after_help = EXIT_STATUS)]
    Translate(translate::TranslateArgs),
    /// Build an engine folder for this GPU (or CPU): optimized graph, tuned token budget, manifest.
    #[command(after_help = EXIT_STATUS)]
    Build(Box<build_cmd::BuildArgs>),
    /// Accuracy gate: a candidate engine's embeddings against a reference; exit 0 pass, 1 fail,
    /// 2 usage, 3+ could not run (see the exit status below).
    #[command(after_help = EXIT_STATUS)]
    Gate(Box<gate_cmd::GateArgs>),
    /// Join the outputs of `embed --input-shard I/N` or the prediction_scores.h5 of `predict
    /// --input-shard I/N` (every I of one N) into one file in input order, as one run over the
    /// whole input writes it; parts of different runs or subcommands, a missing or a repeated
    /// shard are refused.
    #[command(after_help = EXIT_STATUS)]
    Merge(Box<merge_cmd::MergeArgs>),
    /// VirNucPro's prediction_results.txt and prediction_results_highestscore.csv and the
    /// verdicts, from a finished prediction_scores.h5 (one predict run's, or the merge of every
    /// `predict --input-shard` part) and the inputs it was computed from.
    ///
    /// The chunk length and translation are read from the scores file; the models are not needed.
    /// After `merge` of the shards' scores, the files have the rows, order and formats of one
    /// `predict` over the whole input; a score can differ in float32 rounding, since a shard's
    /// packs hold other frames than the single run's.
    #[command(after_help = EXIT_STATUS)]
    Results(Box<results_cmd::ResultsArgs>),
}

/// The exit status table, shown by every `--help`.
const EXIT_STATUS: &str = "Exit status: 0 success (gate: passed), 1 gate failed, 2 usage error \
(flag, value out of range, run config), 3 input error (unreadable or invalid input, or not the input \
a --resume continues), 4 output error (cannot write the output, working folder or report; in use; \
disk full), 5 model or engine error, 6 other error, 130/143 stopped by SIGINT/SIGTERM.";

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and exit 0; real usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            });
        }
    };
    let result = match &cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Translate(args) => translate::run(args),
        Command::Build(args) => build_cmd::run(args),
        Command::Gate(args) => gate_cmd::run(args),
        Command::Merge(args) => merge_cmd::run(args),
        Command::Results(args) => results_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virnuc-trt: error: {}", error_text(&e));
            ExitCode::from(exit::code_of(&e))
        }
    }
}

/// The error and its causes, each once. Many library errors quote their cause in their own message
/// (for callers that print only the top) and also return it as `source()`; anyhow's `{:#}` would
/// then print that cause twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The reader of our standard output went away (`| head`): not a failure (ripgrep does the same).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_error_cause_is_printed_once() {
        // CoreError::Io says "cannot read PATH: CAUSE" and also returns CAUSE as its source.
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (os error 2)");
        let e = anyhow::Error::from(virnuc_core::CoreError::Io {
            path: "models/x.yaml".into(),
            source: io,
        })
        .context("cannot load the model");
        let text = error_text(&e);
        assert_eq!(
            text,
            "cannot load the model: cannot read models/x.yaml: no such file (os error 2)"
        );
        // What `{:#}` printed before.
        assert_eq!(format!("{e:#}").matches("no such file").count(), 2);
        // A cause that the message does not quote is still printed.
        let e = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(error_text(&e), "outer: inner cause");
    }
}
