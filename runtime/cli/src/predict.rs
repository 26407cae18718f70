//! `virnuc-trt predict`: VirNucPro's viral predictions end to end.
//!
//! ```text
//!  inputs ─► pipeline: chunk → six frames → stop-free frames; each frame tokenized twice:
//!            its DNA span (DNABERT-S BPE) and its protein (ESM-2)  ─► one packer per model
//!        ─► DNABERT-S engine thread ─┐                          (both engines share the device)
//!        ─► ESM-2 engine thread ─────┴► writer thread: join the two means per frame (output index)
//!           → [768 | H_esm] → classifier (fp32, a batch per pack) → prediction_scores.h5 (journaled
//!             shards, resumable) and optionally --features FILE.h5
//!  finish ─► one pass in input order over the records and prediction_scores.h5:
//!           prediction_results.txt, prediction_results_highestscore.csv, prediction_verdicts.tsv
//! ```
//!
//! The per-frame probabilities are the resume journal: an interrupted run continues with `--resume`
//! (done frames skipped pack by pack, so packing and thus every bit equals an uninterrupted run's),
//! and the text files are always written at the end, atomically, from the finished scores file.

use std::collections::HashMap;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use crossbeam_channel::{Receiver, Select};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use virnuc_build::engine_build::check_engine_dir;
use virnuc_core::{ModelFamily, ModelMetadata, SequenceMeta, TokenizerSpec};
use virnuc_data::chunk::chunk_count;
use virnuc_data::loader::Source;
use virnuc_data::translate::{Ambiguity, Frame, FrameOutcome, Translator};
use virnuc_data::{Encoder, InputShard, LongPolicy, Mode, PipelineConfig, RunReport};
use virnuc_engine::{EngineInfo, EngineOptions, EngineThreadStats, Ep, JobResult, ModelFiles};
use virnuc_output::{EmbeddingWriter, OutputConfig, OutputDtype, OutputError};
use virnuc_predict::Classifier;
use virnuc_predict::results::{
    HIGHEST_FILE, HighestScore, RESULTS_FILE, RESULTS_HEADER, RecordInfo, VERDICTS_FILE,
    VERDICTS_HEADER, results_line, verdict,
};

use crate::devices::{DeviceList, DeviceReport, Engines, ModelRun, WorkerSlot};
use crate::embed::write_atomic;
use crate::settings::{CPU_TOKS_PER_BATCH, GPU_TOKS_PER_BATCH, UsageError, usage};

/// Per-frame probabilities `[P(others), P(virus)]` in input order (HDF5, as `embed` writes).
pub const SCORES_FILE: &str = "prediction_scores.h5";
pub const REPORT_FILE: &str = "predict_report.json";
/// Residues per protein given to ESM-2: fair-esm's 1022. VirNucPro's chunks (≤ 500 bp) give at most
/// 166, so neither its mean over the first 1024 residues nor this limit ever cuts one.
const MAX_RESIDUES: usize = 1022;
/// Encoder order in the pipeline (the tag of each pack): DNABERT-S 0, ESM-2 1.
const DNABERT: usize = 0;
const ESM: usize = 1;

/// Flags of `virnuc-trt predict`.
#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// FASTA/FASTQ files with DNA (plain, .gz, .zst, .bz2, .xz). Read twice (inference, then the
    /// per-record verdicts), so standard input is not accepted.
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// ESM-2 model: an exported folder (model.onnx + model.json) or an engine folder from
    /// `virnuc-trt build` (VirNucPro: esm2_t36_3B, 2560 wide).
    #[arg(long, value_name = "DIR|FILE")]
    pub esm: Option<PathBuf>,
    /// DNABERT-S model: an exported folder (with its tokenizer.json) or an engine folder.
    #[arg(long, value_name = "DIR|FILE")]
    pub dnabert: Option<PathBuf>,
    /// VirNucPro classifier converted by the exporter (`python -m virnuc_export --classifier
    /// 500_model.pth --out DIR`): the folder, its classifier.json or classifier.safetensors.
    #[arg(long, value_name = "DIR|FILE")]
    pub classifier: Option<PathBuf>,
    /// Chunk length in bp: 300 or 500, the length the classifier was trained on (VirNucPro's
    /// 300_model.pth / 500_model.pth).
    #[arg(long, value_name = "300|500")]
    pub chunk: Option<usize>,
    /// Output folder: prediction_results.txt, prediction_results_highestscore.csv (VirNucPro's),
    /// prediction_verdicts.tsv (one line per input record), prediction_scores.h5 (per frame),
    /// predict_report.json.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Also keep each frame's classifier input `[DNABERT-S mean | ESM-2 mean]` in this HDF5 file.
    #[arg(long, value_name = "FILE.h5")]
    pub features: Option<PathBuf>,
    /// Translate as virnuc-trt's default (ambiguous codons → `X`, each frame's exact coded bases to
    /// DNABERT-S) instead of VirNucPro's own way (ambiguous codons dropped, its DNA span one base
    /// longer), which is the default because its classifier was trained on it.
    #[arg(long)]
    pub no_virnucpro_compat: bool,
    /// Token budget of a pack, for each model. [default: 16384; 2048 on the CPU]
    #[arg(long, value_name = "N")]
    pub toks_per_batch: Option<usize>,
    /// Translation/tokenization threads (0 = one per core). [default: 0]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Packs prepared ahead of each engine. [default: 4]
    #[arg(long, value_name = "N")]
    pub prefetch: Option<usize>,
    /// Execution provider of both models: `cpu`, `cuda`, `tensorrt` or `auto`. [default: auto]
    #[arg(long, value_name = "EP")]
    pub ep: Option<Ep>,
    /// GPU both models run on.
    #[arg(long, value_name = "N", env = "CUDA_DEVICE_ORDINAL")]
    pub device: Option<i32>,
    /// Continue an interrupted run of the same command: done frames are skipped, the outputs equal
    /// an uninterrupted run's.
    #[arg(long)]
    pub resume: bool,
    /// YAML run config with any of these settings by their long names with `_` (flags win).
    #[arg(long, value_name = "run.yaml")]
    pub config: Option<PathBuf>,
    /// JSON run report. [default: OUT_DIR/predict_report.json]
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// ONNX Runtime shared library (else $ORT_DYLIB_PATH, else the defaults of `embed`).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads of each model on the CPU provider (0 = its choice).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Folder of varlen_attention.fatbin (`virnuc`-flavor models on cuda/tensorrt).
    #[arg(long, value_name = "PATH")]
    pub kernel_dir: Option<PathBuf>,
    /// Frames per shard of prediction_scores.h5 (the work lost to a crash). [default: 4096]
    #[arg(long, value_name = "N")]
    pub shard_sequences: Option<usize>,
    /// Skip the sha256 check of model.onnx against model.json.
    #[arg(long)]
    pub skip_hash: bool,
    /// Predict only part I of N of the input (0 ≤ I < N): the records at positions ≡ I mod N, all
    /// files in order, each record whole. Run N of them (a scheduler's job array: `--input-shard
    /// $SLURM_ARRAY_TASK_ID/N`), each with its own --out-dir, then `virnuc-trt merge` their
    /// prediction_scores.h5 and `virnuc-trt results` the merged file for VirNucPro's files of the
    /// whole input. A shard's own text files cover its records only.
    #[arg(long, value_name = "I/N", env = "VIRNUC_INPUT_SHARD")]
    pub input_shard: Option<InputShard>,
    /// Several devices under one command: `0,1,2,3` (GPU indices), `all` (every visible GPU), or
    /// `cpu:N` (N worker processes on the CPU provider, with --ep cpu). Each worker process opens
    /// both models on its device; frames are packed here and the packs handed out as devices free
    /// up; one output folder in input order, the same files as one device writes; one report with
    /// a section per device. A worker that dies is started again once; then the others take its
    /// share and the report names it.
    #[arg(
        long,
        value_name = "LIST",
        env = "VIRNUC_DEVICES",
        conflicts_with = "device"
    )]
    pub devices: Option<String>,
    /// Internal: this process is worker K of a --devices run (`K,DEVICE,LIFE`).
    #[arg(long, hide = true, value_name = "K,DEVICE,LIFE")]
    pub worker_slot: Option<WorkerSlot>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// The YAML run config of `predict`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictConfig {
    pub inputs: Option<Vec<PathBuf>>,
    pub esm: Option<PathBuf>,
    pub dnabert: Option<PathBuf>,
    pub classifier: Option<PathBuf>,
    pub chunk: Option<usize>,
    pub out_dir: Option<PathBuf>,
    pub features: Option<PathBuf>,
    pub no_virnucpro_compat: Option<bool>,
    pub toks_per_batch: Option<usize>,
    pub workers: Option<usize>,
    pub prefetch: Option<usize>,
    pub ep: Option<String>,
    pub device: Option<i32>,
    pub resume: Option<bool>,
    pub report: Option<PathBuf>,
    pub ort_lib: Option<PathBuf>,
    pub threads: Option<usize>,
    pub kernel_dir: Option<PathBuf>,
    pub shard_sequences: Option<usize>,
    pub skip_hash: Option<bool>,
    pub input_shard: Option<InputShard>,
    pub devices: Option<String>,
}

impl PredictConfig {
    fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read run config {}", path.display()))?;
        let mut c: Self = match serde_saphyr::from_str(&text) {
            Ok(c) => c,
            Err(e) => return usage(format!("{} is not a valid run config: {e}", path.display())),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        c.inputs.iter_mut().flatten().for_each(fix);
        for p in [
            &mut c.esm,
            &mut c.dnabert,
            &mut c.classifier,
            &mut c.out_dir,
            &mut c.features,
            &mut c.report,
            &mut c.ort_lib,
            &mut c.kernel_dir,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        Ok(c)
    }
}

/// Everything `predict` runs with.
#[derive(Debug, Clone)]
pub struct PredictSettings {
    pub inputs: Vec<PathBuf>,
    pub esm: PathBuf,
    pub dnabert: PathBuf,
    pub classifier: PathBuf,
    pub chunk: usize,
    pub out_dir: PathBuf,
    pub features: Option<PathBuf>,
    pub virnucpro_compat: bool,
    pub toks_per_batch: usize,
    pub toks_per_batch_set: bool,
    pub workers: usize,
    pub prefetch: usize,
    pub ep: Ep,
    pub device: Option<i32>,
    pub resume: bool,
    pub report: PathBuf,
    pub ort_lib: Option<PathBuf>,
    pub threads: usize,
    pub kernel_dir: Option<PathBuf>,
    pub shard_sequences: usize,
    pub skip_hash: bool,
    pub quiet: bool,
    pub input_shard: Option<InputShard>,
    /// `--devices`: one worker process per device (`None` in a worker).
    pub devices: Option<DeviceList>,
    /// Set in a worker process of a `--devices` run.
    pub worker: Option<WorkerSlot>,
}

impl PredictSettings {
    pub fn resolve(a: &PredictArgs) -> Result<Self> {
        let c = match &a.config {
            Some(p) => PredictConfig::load(p)?,
            None => PredictConfig::default(),
        };
        let inputs = if a.inputs.is_empty() {
            c.inputs.clone().unwrap_or_default()
        } else {
            a.inputs.clone()
        };
        if inputs.is_empty() {
            return usage("no input files (give INPUT... or `inputs:` in --config)");
        }
        if let Some(p) = inputs.iter().find(|p| p.as_os_str() == "-") {
            return usage(format!(
                "{}: predict reads its inputs twice (inference, then the per-record verdicts); \
                 give files, not standard input",
                p.display()
            ));
        }
        let need = |v: Option<PathBuf>, what: &str| -> Result<PathBuf> {
            v.ok_or_else(|| UsageError(format!("{what} is required")).into())
        };
        let esm = need(
            a.esm.clone().or(c.esm.clone()),
            "--esm (ESM-2 model or engine folder)",
        )?;
        let dnabert = need(
            a.dnabert.clone().or(c.dnabert.clone()),
            "--dnabert (DNABERT-S model or engine folder)",
        )?;
        let classifier = need(
            a.classifier.clone().or(c.classifier.clone()),
            "--classifier (the exporter's classifier folder)",
        )?;
        let out_dir = need(a.out_dir.clone().or(c.out_dir.clone()), "--out-dir")?;
        let Some(chunk) = a.chunk.or(c.chunk) else {
            return usage("--chunk is required: 300 or 500, as the classifier was trained");
        };
        if chunk != 300 && chunk != 500 {
            return usage(format!(
                "--chunk {chunk}: VirNucPro's classifiers are trained on 300 or 500 bp chunks"
            ));
        }
        let ep = match (a.ep, &c.ep) {
            (Some(ep), _) => ep,
            (None, Some(s)) => match s.parse() {
                Ok(ep) => ep,
                Err(e) => return usage(e),
            },
            (None, None) => Ep::Auto,
        };
        let budget = a.toks_per_batch.or(c.toks_per_batch);
        let s = Self {
            report: a
                .report
                .clone()
                .or(c.report.clone())
                .unwrap_or_else(|| out_dir.join(REPORT_FILE)),
            inputs,
            esm,
            dnabert,
            classifier,
            chunk,
            out_dir,
            features: a.features.clone().or(c.features.clone()),
            virnucpro_compat: !(a.no_virnucpro_compat || c.no_virnucpro_compat.unwrap_or(false)),
            toks_per_batch: budget.unwrap_or(if ep == Ep::Cpu {
                CPU_TOKS_PER_BATCH
            } else {
                GPU_TOKS_PER_BATCH
            }),
            toks_per_batch_set: budget.is_some(),
            workers: a.workers.or(c.workers).unwrap_or(0),
            prefetch: a.prefetch.or(c.prefetch).unwrap_or(4),
            ep,
            device: a.device.or(c.device),
            resume: a.resume || c.resume.unwrap_or(false),
            ort_lib: a.ort_lib.clone().or(c.ort_lib.clone()),
            threads: a.threads.or(c.threads).unwrap_or(0),
            kernel_dir: a.kernel_dir.clone().or(c.kernel_dir.clone()),
            shard_sequences: a.shard_sequences.or(c.shard_sequences).unwrap_or(4096),
            skip_hash: a.skip_hash || c.skip_hash.unwrap_or(false),
            quiet: a.quiet,
            input_shard: a.input_shard.or(c.input_shard),
            devices: None,
            worker: a.worker_slot,
        };
        let mut s = s;
        if let Some(shard) = s.input_shard
            && !shard.is_valid()
        {
            return usage(format!("--input-shard {shard}: I must be below N"));
        }
        match (&s.worker, a.devices.as_ref().or(c.devices.as_ref())) {
            (Some(w), _) => s.device = Some(w.device),
            (None, Some(text)) => match DeviceList::for_ep(text, s.ep) {
                Ok(list) => s.devices = Some(list),
                Err(e) => return usage(e),
            },
            (None, None) => {}
        }
        if !(3..=1 << 24).contains(&s.toks_per_batch) {
            return usage(format!(
                "--toks-per-batch {} outside 3..=16777216",
                s.toks_per_batch
            ));
        }
        if s.prefetch == 0 || s.prefetch > 1024 || s.shard_sequences == 0 {
            return usage("--prefetch must be 1..=1024 and --shard-sequences ≥ 1");
        }
        if s.workers > 4096 || s.threads > 4096 {
            return usage("--workers and --threads must be at most 4096");
        }
        Ok(s)
    }

    fn ambiguity(&self) -> Ambiguity {
        if self.virnucpro_compat {
            Ambiguity::Drop
        } else {
            Ambiguity::X
        }
    }
}

/// One model of the run: where it is, how it opens, what it is.
struct ModelSpec {
    role: &'static str,
    path: PathBuf,
    options: EngineOptions,
    /// The tuned budget of an engine folder.
    budget: Option<usize>,
    metadata: ModelMetadata,
    /// The folder holding model.json (and a tokenizer file).
    dir: PathBuf,
}

fn open_spec(role: &'static str, path: &Path, s: &PredictSettings) -> Result<ModelSpec> {
    let is_engine = path.join(virnuc_build::manifest::MANIFEST_FILE).is_file();
    let (mut options, budget) = if is_engine {
        let checked = check_engine_dir(path, s.ort_lib.as_deref(), s.device, false)
            .with_context(|| format!("--{role} engine {}", path.display()))?;
        if s.ep != Ep::Auto && s.ep != checked.options.ep {
            return usage(format!(
                "--ep {} but the {role} engine {} was built for {}",
                s.ep.name(),
                path.display(),
                checked.manifest.ep
            ));
        }
        (checked.options, Some(checked.budget))
    } else {
        let mut o = EngineOptions::new(path, s.ep);
        o.ort_lib = s.ort_lib.clone();
        o.device_id = s.device.unwrap_or(0);
        (o, None)
    };
    options.intra_threads = s.threads;
    options.skip_hash = s.skip_hash;
    options.kernel_dir = s.kernel_dir.clone();
    let files = ModelFiles::locate(&options.model)
        .with_context(|| format!("--{role} {}", path.display()))?;
    let metadata = files
        .load_metadata(true)
        .with_context(|| format!("--{role} {}", path.display()))?;
    let dir = files
        .metadata
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    Ok(ModelSpec {
        role,
        path: path.to_path_buf(),
        options,
        budget,
        metadata,
        dir,
    })
}

/// Checks the families and widths of both models against the classifier, before any work.
fn check_models(esm: &ModelSpec, dna: &ModelSpec, clf: &Classifier) -> Result<()> {
    for (spec, family) in [(esm, ModelFamily::Esm2), (dna, ModelFamily::DnabertS)] {
        if spec.metadata.family != family {
            return usage(format!(
                "--{} {} is a {} model, not {}",
                spec.role,
                spec.path.display(),
                family_name(spec.metadata.family),
                family_name(family)
            ));
        }
    }
    clf.check_models(
        dna.metadata.model.hidden_size as usize,
        esm.metadata.model.hidden_size as usize,
    )
    .map_err(|m| UsageError(m).into())
}

fn family_name(f: ModelFamily) -> &'static str {
    match f {
        ModelFamily::Esm2 => "ESM-2",
        ModelFamily::DnabertS => "DNABERT-S",
    }
}

fn dnabert_encoder(spec: &ModelSpec) -> Result<Encoder> {
    let file = match &spec.metadata.tokenizer {
        TokenizerSpec::HfTokenizers { file, .. } => spec.dir.join(file),
        TokenizerSpec::Esm2Alphabet => {
            bail!(
                "--dnabert {}: model.json names no tokenizer file",
                spec.path.display()
            )
        }
    };
    Encoder::for_model(&spec.metadata, Some(&file))
        .with_context(|| format!("--dnabert {}", spec.path.display()))
}

/// The JSON run report.
#[derive(Debug, Serialize)]
pub struct PredictReport {
    pub virnuc_trt_version: &'static str,
    pub out_dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub esm_model: String,
    pub dnabert_model: String,
    pub classifier: PathBuf,
    pub classifier_source: virnuc_predict::classifier::ClassifierSource,
    /// Any of the three has random weights: the predictions mean nothing.
    pub random_weights: bool,
    pub virnucpro_compat: bool,
    pub chunk_len: usize,
    pub ep: &'static str,
    /// `--input-shard I/N`: the files hold the records of this shard only.
    pub input_shard: Option<String>,
    pub records: u64,
    pub records_without_frames: u64,
    /// Up to 100 of them (all are in prediction_verdicts.tsv with verdict `no_frames`).
    pub records_without_frames_first: Vec<String>,
    pub records_virus: u64,
    pub chunks: u64,
    pub chunks_virus: u64,
    pub frames: u64,
    pub frames_virus: u64,
    pub frames_this_run: u64,
    pub resumed: bool,
    pub token_budget: usize,
    pub esm_engine: EngineStats,
    pub dnabert_engine: EngineStats,
    pub wall_s: f64,
    /// First pack in to last pack out, both engines.
    pub predict_wall_s: f64,
    pub frames_per_s: f64,
    /// `--devices`: what each device did (packs, busy share, restarts, whether it failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceReport>>,
    /// The data path's report of the inference pass (every record accounted for).
    pub data: Option<RunReport>,
}

/// One engine's share of the run.
#[derive(Debug, Serialize, Default)]
pub struct EngineStats {
    pub packs: u64,
    pub tokens: u64,
    pub busy_s: f64,
    pub busy_fraction: f64,
    pub starved_s: f64,
    pub open_s: f64,
}

impl From<&EngineThreadStats> for EngineStats {
    fn from(s: &EngineThreadStats) -> Self {
        Self {
            packs: s.packs,
            tokens: s.tokens,
            busy_s: s.busy_s,
            busy_fraction: s.busy_fraction(),
            starved_s: s.starved_s,
            open_s: s.open_s,
        }
    }
}

pub fn run(args: &PredictArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut s = PredictSettings::resolve(args)?;
    let classifier = Classifier::open(&s.classifier).map_err(|e| UsageError(e.to_string()))?;
    let esm = open_spec("esm", &s.esm.clone(), &s)?;
    let dna = open_spec("dnabert", &s.dnabert.clone(), &s)?;
    check_models(&esm, &dna, &classifier)?;
    let encoder = dnabert_encoder(&dna)?;
    if let (false, Some(b)) = (s.toks_per_batch_set, esm.budget.or(dna.budget)) {
        s.toks_per_batch = b;
    }
    if let Some(slot) = s.worker {
        // A worker of a --devices run: the parent owns the input and the outputs.
        return crate::devices::serve(slot, model_runs(&s, &dna, &esm), s.prefetch);
    }
    prepare_out_dir(&s)?;
    for p in &s.inputs {
        if !p.is_file() {
            return Err(virnuc_data::DataError::Open {
                file: p.display().to_string(),
                message: "no such file".into(),
            }
            .into());
        }
    }
    let random = esm.metadata.random_weights
        || dna.metadata.random_weights
        || classifier.metadata.random_weights;
    if random {
        eprintln!(
            "virnuc-trt: note: RANDOM weights in {} (a test/demo export): the predictions mean nothing",
            [
                (esm.metadata.random_weights, "the ESM-2 model"),
                (dna.metadata.random_weights, "the DNABERT-S model"),
                (classifier.metadata.random_weights, "the classifier"),
            ]
            .iter()
            .filter(|(r, _)| *r)
            .map(|(_, w)| *w)
            .collect::<Vec<_>>()
            .join(", ")
        );
    }
    let attributes = attributes(&s, &esm, &dna, &classifier);
    let scores = match EmbeddingWriter::open(OutputConfig {
        path: s.out_dir.join(SCORES_FILE),
        hidden_size: 2,
        per_token: false,
        dtype: OutputDtype::F32,
        attributes: attributes.clone(),
        resume: s.resume,
        shard_sequences: s.shard_sequences,
    }) {
        Ok(w) => Some(w),
        Err(OutputError::AlreadyComplete { path }) => {
            eprintln!(
                "virnuc-trt: {} is complete; writing the text outputs from it",
                path.display()
            );
            None
        }
        Err(e) => return Err(e).context("cannot open the scores output"),
    };
    let features = match (&s.features, &scores) {
        (Some(path), Some(_)) => Some(
            EmbeddingWriter::open(OutputConfig {
                path: path.clone(),
                hidden_size: classifier.input_dim(),
                per_token: false,
                dtype: OutputDtype::F32,
                attributes,
                resume: s.resume,
                shard_sequences: s.shard_sequences,
            })
            .with_context(|| format!("cannot open --features {}", path.display()))?,
        ),
        _ => None,
    };
    let mut inference = None;
    if let Some(scores) = scores {
        inference = Some(infer(
            &s,
            &esm,
            &dna,
            encoder,
            &classifier,
            scores,
            features,
        )?);
    }
    write_outputs(&s, &esm, &dna, &classifier, inference, random, t0)
}

/// Refuses finished outputs without --resume; creates the folder.
fn prepare_out_dir(s: &PredictSettings) -> Result<()> {
    if s.out_dir.is_file() {
        bail!("--out-dir {} is a file", s.out_dir.display());
    }
    if !s.resume {
        for name in [RESULTS_FILE, HIGHEST_FILE, VERDICTS_FILE, SCORES_FILE] {
            let path = s.out_dir.join(name);
            if path.exists() {
                // "already exists; refusing to overwrite it (... --resume only continues an
                // interrupted run)": the output error every subcommand gives.
                return Err(OutputError::Exists { path }.into());
            }
        }
    }
    std::fs::create_dir_all(&s.out_dir)
        .with_context(|| format!("cannot create --out-dir {}", s.out_dir.display()))
}

/// Provenance, and everything that decides the bits: a resume must match it.
fn attributes(
    s: &PredictSettings,
    esm: &ModelSpec,
    dna: &ModelSpec,
    clf: &Classifier,
) -> Vec<(String, String)> {
    vec![
        (
            "virnuc_trt_version".into(),
            env!("CARGO_PKG_VERSION").into(),
        ),
        ("content".into(), "virnucpro_predict".into()),
        ("esm_model".into(), esm.metadata.model.name.clone()),
        ("esm_onnx_sha256".into(), esm.metadata.onnx_sha256.clone()),
        ("dnabert_model".into(), dna.metadata.model.name.clone()),
        (
            "dnabert_onnx_sha256".into(),
            dna.metadata.onnx_sha256.clone(),
        ),
        (
            "classifier_safetensors_sha256".into(),
            clf.metadata.safetensors_sha256.clone(),
        ),
        ("labels".into(), "others,virus".into()),
        ("chunk_len".into(), s.chunk.to_string()),
        ("virnucpro_compat".into(), s.virnucpro_compat.to_string()),
        ("token_budget".into(), s.toks_per_batch.to_string()),
        // Which part of the input the file holds ("all" or I/N): `merge` joins the parts of one N.
        (
            "input_shard".into(),
            s.input_shard
                .map_or_else(|| "all".to_string(), |shard| shard.to_string()),
        ),
    ]
}

/// What the inference pass leaves for the finish.
struct Inference {
    frames_this_run: u64,
    resumed: bool,
    esm: EngineThreadStats,
    dna: EngineThreadStats,
    /// `--devices`: what each device did.
    devices: Option<Vec<DeviceReport>>,
    ep: &'static str,
    data: RunReport,
}

/// A frame waiting for its other half: `(meta, mean)` from each model.
#[derive(Default)]
struct Halves {
    dna: Option<(SequenceMeta, Vec<f32>)>,
    esm: Option<(SequenceMeta, Vec<f32>)>,
}

/// The run's two models in pack-tag order (DNABERT-S 0, ESM-2 1), for this process or a worker.
fn model_runs(s: &PredictSettings, dna: &ModelSpec, esm: &ModelSpec) -> Vec<ModelRun> {
    let warmup = (s.ep != Ep::Cpu).then_some(s.toks_per_batch);
    [dna, esm]
        .into_iter()
        .map(|spec| ModelRun {
            name: format!(
                "{} model {}",
                family_name(spec.metadata.family),
                spec.path.display()
            ),
            options: spec.options.clone(),
            warmup,
        })
        .collect()
}

fn infer(
    s: &PredictSettings,
    esm: &ModelSpec,
    dna: &ModelSpec,
    encoder: Encoder,
    classifier: &Classifier,
    scores: EmbeddingWriter,
    features: Option<EmbeddingWriter>,
) -> Result<Inference> {
    let (engines, results) =
        Engines::start(model_runs(s, dna, esm), s.devices.as_ref(), s.prefetch)?;
    let [dna_results, esm_results]: [_; 2] = results
        .try_into()
        .map_err(|_| anyhow!("internal error: not two result channels"))?;
    let (dna_info, esm_info) = (engines.info(DNABERT), engines.info(ESM));
    let ep = esm_info.ep;
    if dna_info.ep != ep {
        bail!(
            "the two models run on different providers ({} and {}); give --ep",
            dna_info.ep,
            ep
        );
    }
    check_outputs(esm_info, dna_info, classifier)?;
    let mut budget = s.toks_per_batch;
    if ep == "cpu" && !s.toks_per_batch_set && esm.budget.is_none() {
        budget = CPU_TOKS_PER_BATCH;
    }
    let resumed = scores.resume_info().sequences_done > 0;
    if resumed {
        eprintln!(
            "virnuc-trt: resuming: {} frames already done",
            scores.resume_info().sequences_done
        );
    }
    let scores_done = scores.done();
    let features_done = features.as_ref().map(EmbeddingWriter::done);
    let done: Arc<dyn Fn(u64) -> bool + Send + Sync> = {
        let (a, b) = (scores_done.clone(), features_done.clone());
        Arc::new(move |i| a(i) && b.as_ref().is_none_or(|f| f(i)))
    };
    let config = PipelineConfig {
        inputs: s.inputs.clone(),
        mode: Mode::Nucleotide,
        chunk_len: s.chunk,
        virnucpro_compat: s.virnucpro_compat,
        max_residues: MAX_RESIDUES,
        long: LongPolicy::Truncate,
        token_budget: budget,
        workers: s.workers,
        prefetch: s.prefetch,
        // Tags DNABERT (0) and ESM (1).
        encoders: vec![Arc::new(encoder), Arc::new(Encoder::esm2())],
        input_shard: s.input_shard,
        ..PipelineConfig::default()
    };
    let mut pipeline = virnuc_data::start(config).context("cannot start reading")?;
    let progress = progress_bar(s.quiet);
    let writer_progress = progress.clone();
    let writer_done = done.clone();
    let clf = classifier.clone();
    let writer = std::thread::Builder::new()
        .name("virnuc-predict-writer".into())
        .spawn(move || {
            join_and_classify(
                &clf,
                [dna_results, esm_results],
                scores,
                features,
                writer_done,
                scores_done,
                features_done,
                writer_progress,
            )
        })
        .context("cannot start the writer thread")?;
    let mut feed_error = None;
    let mut packs_submitted = 0u64;
    while let Some(item) = pipeline.next_tagged() {
        match item {
            Ok((tag, pack)) => {
                if pack.sequences.iter().all(|m| done(m.index)) {
                    continue;
                }
                if engines.submit(tag, pack).is_err() {
                    break;
                }
                packs_submitted += 1;
            }
            Err(e) => {
                feed_error = Some(anyhow!(e).context("reading the input failed"));
                break;
            }
        }
    }
    let engines_done = engines.finish();
    let written = writer
        .join()
        .map_err(|_| anyhow!("the writer thread panicked"))?;
    progress.finish_and_clear();
    let data = pipeline.finish();
    // The first failure in flow order is the cause; later ones are its consequences.
    // (The writer thread stopped its writers itself when it failed.)
    let (written, engines_done) = match (written, engines_done, feed_error) {
        (w, _, Some(e)) => {
            if let Ok((writers, _)) = w {
                stop_writers(writers);
            }
            return Err(e);
        }
        // Results that stopped coming leave frames half joined: the engines' failure is the cause.
        (Err(w), Err(e), _) if w.is::<HalvesMissing>() => return Err(e),
        (Err(e), _, _) => return Err(e),
        (Ok((writers, _)), Err(e), _) => {
            stop_writers(writers);
            return Err(e);
        }
        (Ok(w), Ok(d), None) => (w, d),
    };
    let [dna_stats, esm_stats]: [EngineThreadStats; 2] = engines_done
        .models
        .try_into()
        .map_err(|_| anyhow!("internal error: the engines did not report on both models"))?;
    let data = data.context("reading the input failed")?;
    // Every record accounted for, and every pack handed to the engines (or the device workers)
    // came back once; a violation is a bug. The scores writer's finish refuses a missing frame.
    data.check_accounting()
        .map_err(|e| anyhow!("internal error: the run's accounting does not add up: {e}"))?;
    if esm_stats.packs + dna_stats.packs != packs_submitted {
        bail!(
            "internal error: {packs_submitted} packs went to the engines but {} + {} came back",
            dna_stats.packs,
            esm_stats.packs
        );
    }
    let expected = data.stages.sequences;
    let (writers, n_frames) = written;
    let mut it = writers.into_iter();
    if let Some(w) = it.next() {
        w.finish(expected)
            .with_context(|| format!("cannot finish {}", s.out_dir.join(SCORES_FILE).display()))?;
    }
    if let (Some(w), Some(path)) = (it.next(), &s.features) {
        w.finish(expected)
            .with_context(|| format!("cannot finish {}", path.display()))?;
    }
    Ok(Inference {
        frames_this_run: n_frames,
        resumed,
        esm: esm_stats,
        dna: dna_stats,
        devices: engines_done.devices,
        ep,
        data,
    })
}

/// The engines' output widths against the classifier (the graphs, not only model.json).
fn check_outputs(esm: &EngineInfo, dna: &EngineInfo, clf: &Classifier) -> Result<()> {
    clf.check_models(dna.hidden_size, esm.hidden_size)
        .map_err(|m| UsageError(m).into())
}

type Writers = (Vec<EmbeddingWriter>, u64);

/// The results ended with frames that have one of their two embeddings only.
#[derive(Debug)]
struct HalvesMissing(String);

impl std::fmt::Display for HalvesMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HalvesMissing {}

/// The writer thread: joins each frame's two means by output index, classifies the frames each
/// pack completes as one batch, and stores probabilities (and features) for frames not yet done.
/// On failure the writers are stopped: what is durable stays for `--resume`, a working folder with
/// nothing durable in it is removed (no `.partial` dead end).
#[allow(clippy::too_many_arguments)]
fn join_and_classify(
    clf: &Classifier,
    results: [Receiver<virnuc_engine::Result<JobResult>>; 2],
    mut scores: EmbeddingWriter,
    mut features: Option<EmbeddingWriter>,
    done: Arc<dyn Fn(u64) -> bool + Send + Sync>,
    scores_done: Arc<dyn Fn(u64) -> bool + Send + Sync>,
    features_done: Option<Arc<dyn Fn(u64) -> bool + Send + Sync>>,
    progress: ProgressBar,
) -> Result<Writers> {
    let joined = join_loop(
        clf,
        results,
        &mut scores,
        &mut features,
        done,
        scores_done,
        features_done,
        progress,
    );
    let mut writers = vec![scores];
    writers.extend(features);
    match joined {
        Ok(frames) => Ok((writers, frames)),
        Err(e) => {
            stop_writers(writers);
            Err(e)
        }
    }
}

/// Stops the writers of a failed run (see [`EmbeddingWriter::stop`]).
fn stop_writers(writers: Vec<EmbeddingWriter>) {
    for w in writers {
        w.stop();
    }
}

#[allow(clippy::too_many_arguments)]
fn join_loop(
    clf: &Classifier,
    results: [Receiver<virnuc_engine::Result<JobResult>>; 2],
    scores: &mut EmbeddingWriter,
    features: &mut Option<EmbeddingWriter>,
    done: Arc<dyn Fn(u64) -> bool + Send + Sync>,
    scores_done: Arc<dyn Fn(u64) -> bool + Send + Sync>,
    features_done: Option<Arc<dyn Fn(u64) -> bool + Send + Sync>>,
    progress: ProgressBar,
) -> Result<u64> {
    let mut waiting: HashMap<u64, Halves> = HashMap::new();
    let mut open = [true, true];
    let mut frames = 0u64;
    let start = Instant::now();
    let (dna_w, esm_w) = (768usize, clf.esm_dim());
    while open.iter().any(|&o| o) {
        let mut sel = Select::new();
        let ids: Vec<(usize, usize)> = (0..2)
            .filter(|&k| open[k])
            .map(|k| (sel.recv(&results[k]), k))
            .collect();
        let op = sel.select();
        let k = ids
            .iter()
            .find(|(i, _)| *i == op.index())
            .map(|&(_, k)| k)
            .ok_or_else(|| anyhow!("internal error: unknown channel"))?;
        let r = match op.recv(&results[k]) {
            Ok(r) => r.map_err(|e| anyhow!(e))?,
            Err(_) => {
                open[k] = false;
                continue;
            }
        };
        let h = r.embeddings.hidden_size;
        let want = if k == DNABERT { dna_w } else { esm_w };
        if h != want {
            bail!("internal error: a pack of width {h}, expected {want}");
        }
        let mut ready: Vec<(SequenceMeta, Vec<f32>, Vec<f32>)> = Vec::new();
        for (i, meta) in r.batch.sequences.iter().enumerate() {
            if done(meta.index) {
                continue;
            }
            let row = r.embeddings.mean[i * h..(i + 1) * h].to_vec();
            let slot = waiting.entry(meta.index).or_default();
            let half = Some((meta.clone(), row));
            if k == DNABERT {
                slot.dna = half;
            } else {
                slot.esm = half;
            }
            if slot.dna.is_some() && slot.esm.is_some() {
                let slot = waiting.remove(&meta.index).unwrap_or_default();
                if let (Some((dm, d)), Some((m, e))) = (slot.dna, slot.esm) {
                    if dm.id != m.id {
                        bail!(
                            "internal error: frame {} is {} for ESM-2 but {} for DNABERT-S",
                            m.index,
                            m.id,
                            dm.id
                        );
                    }
                    ready.push((m, d, e));
                }
            }
        }
        if ready.is_empty() {
            continue;
        }
        let mut x = Vec::with_capacity(ready.len() * clf.input_dim());
        for (_, d, e) in &ready {
            x.extend_from_slice(d);
            x.extend_from_slice(e);
        }
        let probs = clf.classify(&x);
        let mut metas = Vec::new();
        let mut flat = Vec::new();
        let mut fmetas = Vec::new();
        let mut frows = Vec::new();
        for (j, ((m, _, _), p)) in ready.iter().zip(&probs).enumerate() {
            if !scores_done(m.index) {
                metas.push(m.clone());
                flat.extend_from_slice(p);
            }
            if features_done.as_ref().is_some_and(|f| !f(m.index)) {
                fmetas.push(m.clone());
                frows.extend_from_slice(&x[j * clf.input_dim()..(j + 1) * clf.input_dim()]);
            }
        }
        let context = || format!("cannot write the frames starting with {}", ready[0].0.id);
        if !metas.is_empty() {
            scores
                .write_pack(&metas, &flat, None)
                .with_context(context)?;
        }
        if let Some(f) = features.as_mut()
            && !fmetas.is_empty()
        {
            f.write_pack(&fmetas, &frows, None).with_context(context)?;
        }
        frames += ready.len() as u64;
        progress.set_position(frames);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        progress.set_message(format!("{:.0} frames/s", frames as f64 / secs));
    }
    if let Some((i, _)) = waiting.iter().next() {
        return Err(HalvesMissing(format!(
            "internal error: {} frames have only one of their two embeddings (e.g. index {i})",
            waiting.len()
        ))
        .into());
    }
    Ok(frames)
}

fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} frames classified, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Reads prediction_scores.h5 in order, a block at a time.
struct ScoreReader {
    ids: hdf5::Dataset,
    probs: hdf5::Dataset,
    n: usize,
    next: usize,
    block: std::collections::VecDeque<(String, [f32; 2])>,
    path: PathBuf,
}

impl ScoreReader {
    const BLOCK: usize = 65536;

    fn open(path: &Path) -> Result<Self> {
        let f =
            hdf5::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let ids = f
            .dataset("sequence_ids")
            .with_context(|| format!("{}: sequence_ids", path.display()))?;
        let probs = f
            .dataset("embeddings")
            .with_context(|| format!("{}: embeddings", path.display()))?;
        let shape = probs.shape();
        if shape.len() != 2 || shape[1] != 2 || ids.shape() != [shape[0]] {
            bail!("{}: not a predict scores file", path.display());
        }
        Ok(Self {
            n: shape[0],
            ids,
            probs,
            next: 0,
            block: Default::default(),
            path: path.to_path_buf(),
        })
    }

    fn next_frame(&mut self) -> Result<Option<(String, [f32; 2])>> {
        if self.block.is_empty() && self.next < self.n {
            let end = (self.next + Self::BLOCK).min(self.n);
            let ids: Vec<hdf5::types::VarLenUnicode> = self
                .ids
                .read_slice_1d(self.next..end)
                .with_context(|| format!("cannot read {}", self.path.display()))?
                .to_vec();
            let p: ndarray::Array2<f32> = self
                .probs
                .read_slice_2d((self.next..end, ..))
                .with_context(|| format!("cannot read {}", self.path.display()))?;
            for (id, row) in ids.into_iter().zip(p.rows()) {
                self.block
                    .push_back((id.as_str().to_string(), [row[0], row[1]]));
            }
            self.next = end;
        }
        Ok(self.block.pop_front())
    }
}

/// The input a scores file was computed from, read the way the pipeline read it: the VirNucPro
/// files are written from it and the scores.
#[derive(Debug, Clone)]
pub struct ResultsSource {
    pub inputs: Vec<PathBuf>,
    pub chunk: usize,
    pub ambiguity: Ambiguity,
    /// Only these records (a shard's scores file).
    pub input_shard: Option<InputShard>,
}

impl ResultsSource {
    fn of(s: &PredictSettings) -> Self {
        Self {
            inputs: s.inputs.clone(),
            chunk: s.chunk,
            ambiguity: s.ambiguity(),
            input_shard: s.input_shard,
        }
    }

    /// Kept frames of each input record (of the shard), as the pipeline keeps them (same
    /// chunking, translation and record positions).
    fn records(&self) -> impl Iterator<Item = Result<RecordInfo>> + use<> {
        let mut source = Source::new(self.inputs.clone());
        let mut translator = Translator::default();
        let (chunk_len, ambiguity, shard) = (self.chunk, self.ambiguity, self.input_shard);
        let mut failed = false;
        let mut ordinal = 0u64;
        std::iter::from_fn(move || {
            loop {
                if failed {
                    return None;
                }
                let mut info = None;
                let r = source.next_record(|r| {
                    let here = ordinal;
                    ordinal += 1;
                    if !shard.is_none_or(|s| s.takes(here)) {
                        return;
                    }
                    let mut frames = 0u64;
                    for (_, range) in virnuc_data::chunk::chunks(r.seq.len(), chunk_len) {
                        translator.load(&r.seq[range], ambiguity);
                        for frame in Frame::ALL {
                            if translator.frame(frame, ambiguity).0 == FrameOutcome::Kept {
                                frames += 1;
                            }
                        }
                    }
                    info = Some(RecordInfo {
                        id: r.id.to_string(),
                        length: r.seq.len() as u64,
                        chunks: chunk_count(r.seq.len(), chunk_len) as u64,
                        frames,
                    });
                });
                match r {
                    Ok(true) => {
                        if let Some(info) = info {
                            return Some(Ok(info));
                        }
                    }
                    Ok(false) => return None,
                    Err(e) => {
                        failed = true;
                        return Some(Err(
                            anyhow!(e).context("reading the input for the verdicts failed")
                        ));
                    }
                }
            }
        })
    }
}

/// What VirNucPro's files and the verdicts say, counted as they are written.
#[derive(Debug, Clone, Default)]
pub struct ResultsSummary {
    pub records: u64,
    pub records_without_frames: u64,
    pub records_without_frames_first: Vec<String>,
    pub records_virus: u64,
    pub chunks: u64,
    pub chunks_virus: u64,
    /// Chunks with at least one frame (the rows of the highest-score csv).
    pub chunks_scored: u64,
    pub frames: u64,
    pub frames_virus: u64,
}

/// The text outputs into `out_dir` (prediction_results.txt, prediction_results_highestscore.csv,
/// prediction_verdicts.tsv), from the records of `source` and the finished scores file, in one
/// pass; each file written under a temporary name and renamed. Every line's format is
/// `virnuc_predict::results`'s. A scores file that is not this input's is an input error.
pub fn write_results(
    source: &ResultsSource,
    scores_path: &Path,
    out_dir: &Path,
) -> Result<ResultsSummary> {
    let mut reader = ScoreReader::open(scores_path)?;
    let tmp = |name: &str| out_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let (results_tmp, verdicts_tmp) = (tmp(RESULTS_FILE), tmp(VERDICTS_FILE));
    let result = (|| -> Result<ResultsSummary> {
        let create = |p: &Path| -> Result<BufWriter<std::fs::File>> {
            Ok(BufWriter::new(std::fs::File::create(p).with_context(
                || format!("cannot write {}", p.display()),
            )?))
        };
        let mut results = create(&results_tmp)?;
        let mut verdicts = create(&verdicts_tmp)?;
        results.write_all(RESULTS_HEADER.as_bytes())?;
        verdicts.write_all(VERDICTS_HEADER.as_bytes())?;
        let mut highest = HighestScore::default();
        let mut line = String::new();
        let mut sum = ResultsSummary::default();
        let mut rows: Vec<(String, [f32; 2])> = Vec::new();
        let not_this_input = |what: String| -> anyhow::Error {
            crate::exit::InputError(format!(
                "{}: {what}: it is not the scores of this input (the inputs, their order or \
                 --input-shard differ)",
                scores_path.display()
            ))
            .into()
        };
        for info in source.records() {
            let info = info?;
            sum.records += 1;
            sum.chunks += info.chunks;
            rows.clear();
            for _ in 0..info.frames {
                let Some((id, p)) = reader.next_frame()? else {
                    return Err(not_this_input(format!(
                        "it ends before the frames of record {} ('{}')",
                        sum.records, info.id
                    )));
                };
                if !id.starts_with(&info.id) || !id[info.id.len()..].starts_with("_chunk_") {
                    return Err(not_this_input(format!(
                        "frame {id} where a frame of record '{}' was expected",
                        info.id
                    )));
                }
                line.clear();
                results_line(&mut line, &id, p);
                results.write_all(line.as_bytes())?;
                highest.add(&id, p);
                sum.frames += 1;
                sum.frames_virus += u64::from(virnuc_predict::classifier::label(p) == "virus");
                rows.push((id, p));
            }
            let v = verdict(&info, rows.iter().map(|(id, p)| (id.as_str(), *p)));
            match v.call() {
                "no_frames" => {
                    sum.records_without_frames += 1;
                    if sum.records_without_frames_first.len() < 100 {
                        sum.records_without_frames_first.push(info.id.clone());
                    }
                }
                "virus" => sum.records_virus += 1,
                _ => {}
            }
            verdicts.write_all(v.line().as_bytes())?;
        }
        if reader.next_frame()?.is_some() {
            return Err(not_this_input(
                "it holds more frames than this input has".to_string(),
            ));
        }
        let finish = |w: BufWriter<std::fs::File>, p: &Path| -> Result<()> {
            let f = w
                .into_inner()
                .map_err(|e| anyhow!("cannot write {}: {}", p.display(), e.error()))?;
            f.sync_all()
                .with_context(|| format!("cannot write {}", p.display()))
        };
        finish(results, &results_tmp)?;
        finish(verdicts, &verdicts_tmp)?;
        let mut csv = Vec::new();
        highest.write_to(&mut csv)?;
        sum.chunks_virus = highest.rows().filter(|(_, v)| *v).count() as u64;
        sum.chunks_scored = highest.len() as u64;
        write_atomic(&out_dir.join(HIGHEST_FILE), &csv)
            .with_context(|| format!("cannot write {}", out_dir.join(HIGHEST_FILE).display()))?;
        for (tmp, name) in [(&results_tmp, RESULTS_FILE), (&verdicts_tmp, VERDICTS_FILE)] {
            std::fs::rename(tmp, out_dir.join(name))
                .with_context(|| format!("cannot write {}", out_dir.join(name).display()))?;
        }
        Ok(sum)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&results_tmp);
        let _ = std::fs::remove_file(&verdicts_tmp);
    }
    result
}

/// The text outputs, from the records and the finished scores file, in one pass; then the report.
fn write_outputs(
    s: &PredictSettings,
    esm: &ModelSpec,
    dna: &ModelSpec,
    clf: &Classifier,
    inference: Option<Inference>,
    random: bool,
    t0: Instant,
) -> Result<()> {
    let sum = write_results(
        &ResultsSource::of(s),
        &s.out_dir.join(SCORES_FILE),
        &s.out_dir,
    )?;
    let (esm_stats, dna_stats, predict_wall, ep, data, resumed, this_run, devices) = match inference
    {
        Some(i) => (
            EngineStats::from(&i.esm),
            EngineStats::from(&i.dna),
            i.esm.wall_s.max(i.dna.wall_s),
            i.ep,
            Some(i.data),
            i.resumed,
            i.frames_this_run,
            i.devices,
        ),
        None => (
            EngineStats::default(),
            EngineStats::default(),
            0.0,
            "none",
            None,
            true,
            0,
            None,
        ),
    };
    let report = PredictReport {
        virnuc_trt_version: env!("CARGO_PKG_VERSION"),
        out_dir: s.out_dir.clone(),
        files: [RESULTS_FILE, HIGHEST_FILE, VERDICTS_FILE, SCORES_FILE]
            .iter()
            .map(|n| s.out_dir.join(n))
            .chain(s.features.clone())
            .collect(),
        esm_model: esm.metadata.model.name.clone(),
        dnabert_model: dna.metadata.model.name.clone(),
        classifier: clf.path.clone(),
        classifier_source: clf.metadata.source.clone(),
        random_weights: random,
        virnucpro_compat: s.virnucpro_compat,
        chunk_len: s.chunk,
        ep,
        input_shard: s.input_shard.map(|x| x.to_string()),
        records: sum.records,
        records_without_frames: sum.records_without_frames,
        records_without_frames_first: sum.records_without_frames_first.clone(),
        records_virus: sum.records_virus,
        chunks: sum.chunks,
        chunks_virus: sum.chunks_virus,
        frames: sum.frames,
        frames_virus: sum.frames_virus,
        frames_this_run: this_run,
        resumed,
        token_budget: s.toks_per_batch,
        esm_engine: esm_stats,
        dnabert_engine: dna_stats,
        wall_s: t0.elapsed().as_secs_f64(),
        predict_wall_s: predict_wall,
        frames_per_s: if predict_wall > 0.0 {
            this_run as f64 / predict_wall
        } else {
            0.0
        },
        devices,
        data,
    };
    let json = serde_json::to_string_pretty(&report).context("run report")?;
    write_atomic(&s.report, json.as_bytes())
        .with_context(|| format!("cannot write the run report {}", s.report.display()))?;
    eprintln!(
        "{}; results in {}{}",
        summary_line(&sum),
        s.out_dir.display(),
        if random { " (RANDOM weights)" } else { "" }
    );
    Ok(())
}

/// The one-line summary of the VirNucPro files.
pub fn summary_line(sum: &ResultsSummary) -> String {
    format!(
        "virnuc-trt: {} records, {} frames: {} records with a viral chunk, {} of {} chunks viral, \
         {} records without a stop-free frame (listed in {VERDICTS_FILE})",
        sum.records,
        sum.frames,
        sum.records_virus,
        sum.chunks_virus,
        sum.chunks_scored,
        sum.records_without_frames,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: PredictArgs,
    }

    fn resolve(extra: &[&str]) -> Result<PredictSettings> {
        let base = [
            "predict",
            "a.fa",
            "--esm",
            "e",
            "--dnabert",
            "d",
            "--classifier",
            "c",
            "--chunk",
            "500",
            "--out-dir",
            "o",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra)).map_err(|e| anyhow!("{e}"))?;
        PredictSettings::resolve(&cli.args)
    }

    #[test]
    fn devices_and_input_shard_reach_the_settings() {
        let s =
            resolve(&["--ep", "cpu", "--devices", "cpu:2", "--input-shard", "1/3"]).expect("ok");
        assert_eq!(s.devices, Some(DeviceList::Cpu(2)));
        assert_eq!(s.input_shard, Some(InputShard { index: 1, count: 3 }));
        let e = resolve(&["--devices", "cpu:2"]).expect_err("cpu workers need --ep cpu");
        assert!(
            e.is::<UsageError>() && e.to_string().contains("--ep cpu"),
            "{e}"
        );
        assert!(resolve(&["--input-shard", "3/3"]).is_err());
        // A worker takes its device from its slot and ignores --devices.
        let s = resolve(&[
            "--devices",
            "cpu:2",
            "--ep",
            "cpu",
            "--worker-slot",
            "1,0,0",
        ])
        .expect("worker");
        assert_eq!((s.devices, s.device), (None, Some(0)));
    }
}
