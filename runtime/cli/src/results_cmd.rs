//! `virnuc-trt results`: VirNucPro's files and the verdicts from a finished predict scores file
//! and the inputs it was computed from: after `merge` of `predict --input-shard I/N` parts, the
//! files one `predict` over the whole input writes.
//!
//! The chunk length, the translation and the shard are the scores file's own attributes, so the
//! inputs are read exactly as its run read them; the models are not needed. The lines are written
//! by the same code as `predict`'s ([`crate::predict::write_results`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use hdf5::types::VarLenUnicode;
use virnuc_data::InputShard;
use virnuc_data::translate::Ambiguity;
use virnuc_output::OutputError;
use virnuc_predict::results::{HIGHEST_FILE, RESULTS_FILE, VERDICTS_FILE};

use crate::exit::InputError;
use crate::predict::{ResultsSource, summary_line, write_results};
use crate::settings::usage;

/// Flags of `virnuc-trt results`.
#[derive(Debug, Clone, Args)]
pub struct ResultsArgs {
    /// The FASTA/FASTQ files the scores were computed from, in the same order (as given to
    /// `predict`).
    #[arg(value_name = "INPUT", required = true)]
    pub inputs: Vec<PathBuf>,
    /// A finished prediction_scores.h5: of one `predict` run, or `virnuc-trt merge` of the
    /// prediction_scores.h5 of every `predict --input-shard I/N` (each I of one N).
    #[arg(long, value_name = "FILE.h5")]
    pub scores: PathBuf,
    /// Folder for prediction_results.txt, prediction_results_highestscore.csv and
    /// prediction_verdicts.tsv (created; existing ones are refused).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// The attributes of a predict scores file that decide how its input is read.
fn read_source(scores: &Path, inputs: Vec<PathBuf>) -> Result<ResultsSource> {
    let file = hdf5::File::open(scores)
        .map_err(|source| OutputError::NotAnOutput {
            path: scores.to_path_buf(),
            source,
        })
        .with_context(|| format!("cannot open --scores {}", scores.display()))?;
    let attr = |name: &str| -> Option<String> {
        file.attr(name)
            .and_then(|a| a.read_scalar::<VarLenUnicode>())
            .ok()
            .map(|v| v.as_str().to_string())
    };
    let not_scores = |why: String| -> anyhow::Error {
        InputError(format!(
            "--scores {}: {why}: not a predict scores file (prediction_scores.h5 of `virnuc-trt \
             predict` or a merge of them)",
            scores.display()
        ))
        .into()
    };
    match attr("content").as_deref() {
        Some("virnucpro_predict") => {}
        Some(other) => return Err(not_scores(format!("its content is {other:?}"))),
        None => {
            return Err(not_scores(
                "it has no content attribute (an embed output?)".into(),
            ));
        }
    }
    let chunk = attr("chunk_len")
        .and_then(|c| c.parse::<usize>().ok())
        .ok_or_else(|| not_scores("no chunk_len attribute".into()))?;
    let ambiguity = match attr("virnucpro_compat").as_deref() {
        Some("true") => Ambiguity::Drop,
        Some("false") => Ambiguity::X,
        _ => return Err(not_scores("no virnucpro_compat attribute".into())),
    };
    let input_shard = match attr("input_shard").as_deref() {
        None | Some("all") => None,
        Some(text) => Some(
            text.parse::<InputShard>()
                .map_err(|e| not_scores(format!("input_shard: {e}")))?,
        ),
    };
    Ok(ResultsSource {
        inputs,
        chunk,
        ambiguity,
        input_shard,
    })
}

pub fn run(args: &ResultsArgs) -> Result<()> {
    if let Some(p) = args.inputs.iter().find(|p| p.as_os_str() == "-") {
        return usage(format!(
            "{}: give the input files the scores were computed from, not standard input",
            p.display()
        ));
    }
    for p in &args.inputs {
        if !p.is_file() {
            return Err(virnuc_data::DataError::Open {
                file: p.display().to_string(),
                message: "no such file".into(),
            }
            .into());
        }
    }
    let source = read_source(&args.scores, args.inputs.clone())?;
    if args.out_dir.is_file() {
        return Err(crate::exit::OutputFailure(format!(
            "--out-dir {} is a file",
            args.out_dir.display()
        ))
        .into());
    }
    for name in [RESULTS_FILE, HIGHEST_FILE, VERDICTS_FILE] {
        let path = args.out_dir.join(name);
        if path.exists() {
            return Err(OutputError::Exists { path }.into());
        }
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create --out-dir {}", args.out_dir.display()))?;
    let sum = write_results(&source, &args.scores, &args.out_dir)?;
    eprintln!(
        "{}; written to {}{}",
        summary_line(&sum),
        args.out_dir.display(),
        source
            .input_shard
            .map(|s| format!(" (input shard {s} only)"))
            .unwrap_or_default()
    );
    Ok(())
}
