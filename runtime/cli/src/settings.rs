//! Command-line flags, the YAML run config, and their merge (flag > YAML > default).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;
use virnuc_data::{InputShard, LongPolicy, Mode, PipelineConfig};
use virnuc_engine::Ep;
use virnuc_output::OutputDtype;

/// Default pack budget on GPUs (the budget of the reference figures).
pub const GPU_TOKS_PER_BATCH: usize = 16384;
/// Default pack budget on the CPU: the `masked` flavor's attention takes O(T²) memory per pack.
pub const CPU_TOKS_PER_BATCH: usize = 2048;

/// A usage error: exits with status 2, like clap's own.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(UsageError(msg.into()).into())
}

/// What this machine has, for the ranges of the numeric settings.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    pub cores: usize,
    pub memory_bytes: u64,
}

impl Machine {
    pub fn this() -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: total_memory().unwrap_or(8 << 30),
        }
    }

    /// Threads a stage may usefully run: beyond 4 per core they only add memory and switching.
    pub fn max_threads(&self) -> usize {
        (4 * self.cores).max(16)
    }
}

/// `MemTotal` of /proc/meminfo (Linux); `None` elsewhere.
fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Largest token budget: cu_seqlens are int32, and a pack's host and device buffers (ids,
/// positions, a pooled row per sequence, activations) take on the order of 16 KiB per token of a
/// large model, which must fit a quarter of the memory.
pub fn max_toks_per_batch(m: &Machine) -> usize {
    let by_memory = (m.memory_bytes / 4 / (16 << 10)).max(4096);
    usize::try_from(by_memory)
        .unwrap_or(usize::MAX)
        .min(1 << 24)
}

/// Largest prefetch: packs waiting ahead of the engine (each up to `budget` tokens, ~64 B a token
/// on the host with its metadata) may take an eighth of the memory; more than 256 never helps.
pub fn max_prefetch(m: &Machine, budget: usize) -> usize {
    let per_pack = (budget.max(1) as u64) * 64;
    usize::try_from(m.memory_bytes / 8 / per_pack)
        .unwrap_or(usize::MAX)
        .clamp(1, 256)
}

/// Longest chunk: a reader batch (256 KiB of sequence) holds at least one chunk.
pub const MAX_CHUNK: usize = virnuc_data::pipeline::BATCH_BYTES;
/// Longest protein kept whole: residues are counted in u32 and a window must fit the pack budget
/// limit; ESM-2 itself was trained up to 1022.
pub const MAX_RESIDUES: usize = 1 << 20;
/// Sequences per output shard: the resume check holds a shard's ids while it checks them.
pub const MAX_SHARD_SEQUENCES: usize = 1 << 20;
/// GPU indices: CUDA numbers devices from 0; no host has more than this.
pub const MAX_DEVICE: i32 = 1023;

/// `Err(usage)` unless `lo ≤ value ≤ hi`; the message says the range and why.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    value: T,
    lo: T,
    hi: T,
    why: &str,
) -> Result<()> {
    if value < lo || value > hi {
        return usage(format!(
            "{flag} {value} is out of range: {lo} to {hi} ({why})"
        ));
    }
    Ok(())
}

/// Checks the data settings every subcommand shares.
pub fn check_data_ranges(chunk: usize, max_residues: usize) -> Result<()> {
    check_range(
        "--chunk",
        chunk,
        3,
        MAX_CHUNK,
        "bp: at least one codon, at most one reader batch",
    )?;
    check_range(
        "--max-residues",
        max_residues,
        1,
        MAX_RESIDUES,
        "residues per sequence",
    )
}

/// How inputs become proteins: shared by `embed` and `translate`.
#[derive(Debug, Clone, Args, Default)]
pub struct DataArgs {
    /// What the inputs hold: `nucleotide` (VirNucPro: chunk, six-frame translate, keep stop-free
    /// frames) or `protein` (straight to the tokenizer). [default: nucleotide]
    #[arg(long, value_name = "MODE", env = "VIRNUC_MODE")]
    pub mode: Option<Mode>,
    /// Nucleotide chunk length in bp (VirNucPro uses 300 or 500). [default: 500]
    #[arg(long, value_name = "BP", env = "VIRNUC_CHUNK")]
    pub chunk: Option<usize>,
    /// Residues kept per sequence, `<cls>`/`<eos>` excluded (fair-esm truncates at 1022). [default: 1022]
    #[arg(long, value_name = "N")]
    pub max_residues: Option<usize>,
    /// Sequences longer than --max-residues: `truncate`, `split` into windows, or `skip`. [default: truncate]
    #[arg(long, value_name = "POLICY")]
    pub long: Option<LongPolicy>,
    /// Reproduce VirNucPro exactly: drop ambiguous codons (shifting the frame) instead of `X`; a DNA
    /// model (DNABERT-S) then gets VirNucPro's DNA span of each kept frame, `s[f : f + 1 + 3·aa_len]`
    /// of the upper-cased chunk or of its reverse complement (one base past the codons, and shorter
    /// than them where codons were dropped). Default: the frame's coded bases exactly,
    /// `s[f : f + 3·codons]`, upper-cased.
    #[arg(long)]
    pub virnucpro_compat: bool,
    /// Run even when the first letters of a file do not fit --mode (protein records in nucleotide
    /// mode, DNA in protein mode); without it such a file stops the run with an error.
    #[arg(long)]
    pub force_mode: bool,
}

/// The data flags that do nothing in `mode`, one sentence each (shared by `embed` and `translate`).
pub fn data_flags_ineffective(mode: Mode, chunk_set: bool, virnucpro_compat: bool) -> Vec<String> {
    let mut out = Vec::new();
    if mode == Mode::Protein {
        for (given, flag) in [
            (chunk_set, "--chunk"),
            (virnucpro_compat, "--virnucpro-compat"),
        ] {
            if given {
                out.push(format!(
                    "{flag} has no effect in --mode protein (it applies to nucleotide inputs)"
                ));
            }
        }
    }
    out
}

/// Prints each warning once on standard error.
pub fn warn_all(warnings: &[String]) {
    for w in warnings {
        eprintln!("virnuc-trt: warning: {w}");
    }
}

/// Flags of `virnuc-trt embed`.
#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    /// FASTA/FASTQ files (plain, .gz, .zst, .bz2); `-` reads standard input.
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Exported model: a folder with model.onnx + model.json, or a .onnx file with its .json.
    #[arg(long, short = 'm', value_name = "DIR|FILE", env = "VIRNUC_MODEL")]
    pub model: Option<PathBuf>,
    /// Engine folder made by `virnuc-trt build` (instead of --model): its manifest gives the
    /// provider and the tuned --toks-per-batch, and is checked against this host first.
    #[arg(
        long,
        value_name = "DIR",
        env = "VIRNUC_ENGINE",
        conflicts_with = "model"
    )]
    pub engine: Option<PathBuf>,
    /// Run an --engine folder even when its manifest does not match this host (warns).
    #[arg(long)]
    pub force: bool,
    /// Output HDF5 file (written atomically; `<OUT>.partial/` holds work in progress).
    #[arg(long, short = 'o', value_name = "FILE.h5")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Token budget of a pack, special tokens included. [default: 16384; 2048 on the CPU]
    #[arg(long, value_name = "N", env = "VIRNUC_TOKS_PER_BATCH")]
    pub toks_per_batch: Option<usize>,
    /// Translation/tokenization threads (0 = one per core). [default: 0]
    #[arg(long, value_name = "N", env = "VIRNUC_WORKERS")]
    pub workers: Option<usize>,
    /// Packs prepared ahead of the engine. [default: 4]
    #[arg(long, value_name = "N", env = "VIRNUC_PREFETCH")]
    pub prefetch: Option<usize>,
    /// Execution provider: `cpu`, `cuda`, `tensorrt`, or `auto` (CUDA when usable, else CPU, said so).
    /// An asked provider that cannot be used is an error, never a silent CPU run. [default: auto]
    #[arg(long, value_name = "EP", env = "VIRNUC_EP")]
    pub ep: Option<Ep>,
    /// GPU to use.
    #[arg(long, value_name = "N", env = "CUDA_DEVICE_ORDINAL")]
    pub device: Option<i32>,
    /// Element type of the stored embeddings: `fp32` or `fp16` (the model's own precision is fixed
    /// at export). [default: fp32]
    #[arg(long, value_name = "fp32|fp16")]
    pub precision: Option<Precision>,
    /// Also store per-token states (the model must be exported with `--per-token`).
    #[arg(long)]
    pub per_token: bool,
    /// Continue an interrupted run of the same command (after a crash or kill): done sequences are
    /// skipped, the final file is the same as an uninterrupted run's.
    #[arg(long)]
    pub resume: bool,
    /// YAML run config with any of these settings (flags override it); see `virnuc-trt embed --help`.
    #[arg(long, value_name = "run.yaml")]
    pub config: Option<PathBuf>,
    /// Write the JSON run report here (default: standard output).
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// ONNX Runtime shared library (else $ORT_DYLIB_PATH, else /opt/onnxruntime-gpu/lib, else next
    /// to the binary).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads on the CPU provider (0 = ONNX Runtime's choice).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// TensorRT engine and timing cache folder.
    #[arg(long, value_name = "DIR")]
    pub trt_cache: Option<PathBuf>,
    /// Folder of varlen_attention.fatbin (`virnuc`-flavor models on cuda/tensorrt). [default:
    /// $VIRNUC_KERNEL_DIR, else varlen_attention/ beside the binary, else build/varlen_attention]
    #[arg(long, value_name = "PATH")]
    pub kernel_dir: Option<PathBuf>,
    /// Sequences per output shard (the work lost to a crash). [default: 4096]
    #[arg(long, value_name = "N")]
    pub shard_sequences: Option<usize>,
    /// Embed only part I of N of the input (0 ≤ I < N): the records at positions ≡ I mod N, all
    /// files in order. Run N processes, one per GPU (`--device`) or one per job of a scheduler's
    /// array (Slurm: `--input-shard $SLURM_ARRAY_TASK_ID/N`), each with its own --out; together
    /// the N files hold every sequence once, each record whole in one file.
    #[arg(long, value_name = "I/N", env = "VIRNUC_INPUT_SHARD")]
    pub input_shard: Option<InputShard>,
    /// Skip the sha256 check of model.onnx against model.json (large models, trusted files).
    #[arg(long)]
    pub skip_hash: bool,
    /// Several devices under one command: `0,1,2,3` (GPU indices), `all` (every visible GPU), or
    /// `cpu:N` (N worker processes on the CPU provider, with --ep cpu). One worker process per
    /// device, packs handed out as devices free up, one output in input order (the same file as
    /// one device writes), one report with a section per device. A worker that dies is started
    /// again once; then the others take its share.
    #[arg(
        long,
        value_name = "LIST",
        env = "VIRNUC_DEVICES",
        conflicts_with = "device"
    )]
    pub devices: Option<String>,
    /// Internal: this process is worker K of a --devices run (`K,DEVICE,LIFE`).
    #[arg(long, hide = true, value_name = "K,DEVICE,LIFE")]
    pub worker_slot: Option<crate::devices::WorkerSlot>,
    /// No progress bar (it is also hidden when standard error is not a terminal).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Output element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
}

impl Precision {
    pub fn dtype(self) -> OutputDtype {
        match self {
            Precision::Fp32 => OutputDtype::F32,
            Precision::Fp16 => OutputDtype::F16,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }
}

/// The YAML run config: the same settings as the flags, by their long names with `_`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub inputs: Option<Vec<PathBuf>>,
    pub model: Option<PathBuf>,
    pub engine: Option<PathBuf>,
    pub force: Option<bool>,
    pub kernel_dir: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub mode: Option<Mode>,
    pub chunk: Option<usize>,
    pub max_residues: Option<usize>,
    pub long: Option<LongPolicy>,
    pub virnucpro_compat: Option<bool>,
    pub force_mode: Option<bool>,
    pub toks_per_batch: Option<usize>,
    pub workers: Option<usize>,
    pub prefetch: Option<usize>,
    pub ep: Option<String>,
    pub device: Option<i32>,
    pub precision: Option<Precision>,
    pub per_token: Option<bool>,
    pub resume: Option<bool>,
    pub report: Option<PathBuf>,
    pub ort_lib: Option<PathBuf>,
    pub threads: Option<usize>,
    pub trt_cache: Option<PathBuf>,
    pub shard_sequences: Option<usize>,
    /// `I/N`, as the flag.
    pub input_shard: Option<InputShard>,
    pub skip_hash: Option<bool>,
}

impl RunConfig {
    /// Reads a config; relative paths in it are taken relative to the config file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read run config {}", path.display()))?;
        let mut c: RunConfig = match serde_saphyr::from_str(&text) {
            Ok(c) => c,
            Err(e) => return usage(format!("{} is not a valid run config: {e}", path.display())),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && p.as_os_str() != "-" {
                *p = base.join(&*p);
            }
        };
        c.inputs.iter_mut().flatten().for_each(fix);
        for p in [
            &mut c.model,
            &mut c.engine,
            &mut c.kernel_dir,
            &mut c.out,
            &mut c.report,
            &mut c.ort_lib,
            &mut c.trt_cache,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        Ok(c)
    }
}

/// Everything `embed` runs with, after the merge.
#[derive(Debug, Clone)]
pub struct EmbedSettings {
    pub inputs: Vec<PathBuf>,
    /// The model folder/file, or the --engine folder.
    pub model: PathBuf,
    /// `--engine DIR`: open through its manifest (provider, budget, host check).
    pub engine: Option<PathBuf>,
    pub force: bool,
    /// `--device` as given (an engine's manifest has its own device index).
    pub device_set: Option<i32>,
    pub kernel_dir: Option<PathBuf>,
    pub out: PathBuf,
    pub mode: Mode,
    pub chunk: usize,
    /// --chunk was given (flag or YAML), not defaulted.
    pub chunk_set: bool,
    pub max_residues: usize,
    pub long: LongPolicy,
    pub virnucpro_compat: bool,
    pub force_mode: bool,
    pub toks_per_batch: usize,
    /// The budget was given (flag or YAML), not defaulted.
    pub toks_per_batch_set: bool,
    pub workers: usize,
    pub prefetch: usize,
    pub ep: Ep,
    pub device: i32,
    pub precision: Precision,
    pub per_token: bool,
    pub resume: bool,
    pub report: Option<PathBuf>,
    pub ort_lib: Option<PathBuf>,
    pub threads: usize,
    /// --threads was given (flag or YAML).
    pub threads_set: bool,
    pub trt_cache: Option<PathBuf>,
    pub shard_sequences: usize,
    pub input_shard: Option<InputShard>,
    pub skip_hash: bool,
    pub quiet: bool,
    /// `--devices`: one worker process per device.
    pub devices: Option<crate::devices::DeviceList>,
    /// Set in a worker process of a `--devices` run.
    pub worker: Option<crate::devices::WorkerSlot>,
}

impl EmbedSettings {
    pub fn resolve(args: &EmbedArgs) -> Result<Self> {
        let c = match &args.config {
            Some(p) => RunConfig::load(p)?,
            None => RunConfig::default(),
        };
        let inputs = if args.inputs.is_empty() {
            c.inputs.clone().unwrap_or_default()
        } else {
            args.inputs.clone()
        };
        if inputs.is_empty() {
            return usage("no input files (give INPUT... or `inputs:` in --config)");
        }
        let engine = args.engine.clone().or(c.engine.clone());
        let model = match (args.model.clone().or(c.model.clone()), &engine) {
            (Some(_), Some(_)) => return usage("give --model or --engine, not both"),
            (Some(m), None) => m,
            (None, Some(e)) => e.clone(),
            (None, None) => {
                return usage(
                    "--model is required (an exported model folder or .onnx file), or --engine DIR",
                );
            }
        };
        let Some(out) = args.out.clone().or(c.out.clone()) else {
            return usage("--out is required (the .h5 file to write)");
        };
        let ep = match (args.ep, &c.ep) {
            (Some(ep), _) => ep,
            (None, Some(s)) => match s.parse() {
                Ok(ep) => ep,
                Err(e) => return usage(e),
            },
            (None, None) => Ep::Auto,
        };
        let default_budget = if ep == Ep::Cpu {
            CPU_TOKS_PER_BATCH
        } else {
            GPU_TOKS_PER_BATCH
        };
        let chunk = args.data.chunk.or(c.chunk).unwrap_or(500);
        let settings = Self {
            inputs,
            model,
            engine,
            force: args.force || c.force.unwrap_or(false),
            device_set: args.device.or(c.device),
            kernel_dir: args.kernel_dir.clone().or(c.kernel_dir.clone()),
            out,
            mode: args.data.mode.or(c.mode).unwrap_or_default(),
            chunk,
            chunk_set: args.data.chunk.or(c.chunk).is_some(),
            max_residues: args.data.max_residues.or(c.max_residues).unwrap_or(1022),
            long: args.data.long.or(c.long).unwrap_or_default(),
            virnucpro_compat: args.data.virnucpro_compat || c.virnucpro_compat.unwrap_or(false),
            force_mode: args.data.force_mode || c.force_mode.unwrap_or(false),
            toks_per_batch: args
                .toks_per_batch
                .or(c.toks_per_batch)
                .unwrap_or(default_budget),
            toks_per_batch_set: args.toks_per_batch.or(c.toks_per_batch).is_some(),
            workers: args.workers.or(c.workers).unwrap_or(0),
            prefetch: args.prefetch.or(c.prefetch).unwrap_or(4),
            ep,
            device: args.device.or(c.device).unwrap_or(0),
            precision: args.precision.or(c.precision).unwrap_or(Precision::Fp32),
            per_token: args.per_token || c.per_token.unwrap_or(false),
            resume: args.resume || c.resume.unwrap_or(false),
            report: args.report.clone().or(c.report.clone()),
            ort_lib: args.ort_lib.clone().or(c.ort_lib.clone()),
            threads: args.threads.or(c.threads).unwrap_or(0),
            threads_set: args.threads.or(c.threads).is_some(),
            trt_cache: args.trt_cache.clone().or(c.trt_cache.clone()),
            shard_sequences: args.shard_sequences.or(c.shard_sequences).unwrap_or(4096),
            input_shard: args.input_shard.or(c.input_shard),
            skip_hash: args.skip_hash || c.skip_hash.unwrap_or(false),
            quiet: args.quiet,
            devices: None,
            worker: args.worker_slot,
        };
        let mut settings = settings;
        if let Some(text) = &args.devices
            && settings.worker.is_none()
        {
            let list = match crate::devices::DeviceList::for_ep(text, settings.ep) {
                Ok(l) => l,
                Err(e) => return usage(e),
            };
            settings.devices = Some(list);
        }
        if let Some(w) = settings.worker {
            settings.device = w.device;
            settings.device_set = Some(w.device);
        }
        settings.check_ranges(&Machine::this())?;
        Ok(settings)
    }

    /// Settings that were given but do nothing with this mode and execution provider (`ep`: the
    /// provider the engine runs on), one sentence each, for a warning.
    pub fn ineffective(&self, ep: &str) -> Vec<String> {
        let mut out = data_flags_ineffective(self.mode, self.chunk_set, self.virnucpro_compat);
        let mut no_effect = |given: bool, flag: &str, why: &str| {
            if given {
                out.push(format!("{flag} has no effect {why}"));
            }
        };
        let gpu = ep != "cpu";
        no_effect(
            self.threads_set && gpu,
            "--threads",
            &format!("on {ep} (it sets the CPU provider's threads)"),
        );
        no_effect(
            self.device_set.is_some() && !gpu,
            "--device",
            "on the CPU provider (it selects a GPU)",
        );
        no_effect(
            self.kernel_dir.is_some() && !gpu,
            "--kernel-dir",
            "on the CPU provider (the CUDA kernel is for cuda/tensorrt)",
        );
        no_effect(
            self.trt_cache.is_some() && ep != "tensorrt",
            "--trt-cache",
            &format!("on {ep} (it is the TensorRT engine cache)"),
        );
        no_effect(
            self.force && self.engine.is_none(),
            "--force",
            "without --engine (it runs an engine folder built for another host)",
        );
        out
    }

    /// Every numeric setting against its range (from the machine and the other settings), before
    /// any work: a usage error that says the range.
    pub fn check_ranges(&self, m: &Machine) -> Result<()> {
        let threads = m.max_threads();
        let per_core = format!(
            "0 = one per core; at most 4 per core of the {} here",
            m.cores
        );
        check_range("--workers", self.workers, 0, threads, &per_core)?;
        check_range(
            "--threads",
            self.threads,
            0,
            threads,
            &format!(
                "0 = ONNX Runtime's choice; at most 4 per core of the {} here",
                m.cores
            ),
        )?;
        let max_budget = max_toks_per_batch(m);
        check_range(
            "--toks-per-batch",
            self.toks_per_batch,
            3,
            max_budget,
            &format!(
                "tokens: one residue with <cls> and <eos>, up to what {} GiB of memory holds",
                m.memory_bytes >> 30
            ),
        )?;
        check_range(
            "--prefetch",
            self.prefetch,
            1,
            max_prefetch(m, self.toks_per_batch),
            &format!(
                "packs of {} tokens waiting in an eighth of the memory, at most 256",
                self.toks_per_batch
            ),
        )?;
        check_data_ranges(self.chunk, self.max_residues)?;
        check_range(
            "--shard-sequences",
            self.shard_sequences,
            1,
            MAX_SHARD_SEQUENCES,
            "sequences per output shard",
        )?;
        check_range("--device", self.device, 0, MAX_DEVICE, "GPU index")?;
        Ok(())
    }

    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            inputs: self.inputs.clone(),
            mode: self.mode,
            force_mode: self.force_mode,
            chunk_len: self.chunk,
            virnucpro_compat: self.virnucpro_compat,
            max_residues: self.max_residues,
            long: self.long,
            token_budget: self.toks_per_batch,
            workers: self.workers,
            prefetch: self.prefetch,
            input_shard: self.input_shard,
            ..PipelineConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: EmbedArgs,
    }

    fn parse(args: &[&str]) -> EmbedArgs {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("parses")
            .a
    }

    #[test]
    fn flags_override_yaml_and_yaml_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("run.yaml");
        std::fs::write(
            &cfg,
            "inputs: [a.fa]\nmodel: m\nout: o.h5\nmode: protein\ntoks_per_batch: 100\nep: cpu\n",
        )
        .expect("write");
        let s = EmbedSettings::resolve(&parse(&[
            "--config",
            cfg.to_str().expect("utf8"),
            "--toks-per-batch",
            "200",
        ]))
        .expect("resolves");
        assert_eq!(s.inputs, vec![dir.path().join("a.fa")]);
        assert_eq!(s.model, dir.path().join("m"));
        assert_eq!(s.mode, Mode::Protein);
        assert_eq!(s.toks_per_batch, 200);
        assert_eq!(s.ep, Ep::Cpu);
    }

    #[test]
    fn unknown_yaml_keys_and_missing_settings_are_usage_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("run.yaml");
        std::fs::write(&cfg, "toks_per_btach: 5\n").expect("write");
        let e = EmbedSettings::resolve(&parse(&["--config", cfg.to_str().expect("utf8")]))
            .expect_err("typo");
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        let e = EmbedSettings::resolve(&parse(&["x.fa", "--out", "o.h5"])).expect_err("no model");
        assert!(e.to_string().contains("--model"), "{e}");
    }

    #[test]
    fn regression_flags_that_do_nothing_are_named() {
        let s = EmbedSettings::resolve(&parse(&[
            "a.fa",
            "-m",
            "m",
            "-o",
            "o.h5",
            "--mode",
            "protein",
            "--chunk",
            "300",
            "--threads",
            "4",
            "--trt-cache",
            "c",
            "--force",
        ]))
        .expect("resolves");
        let w = s.ineffective("cuda");
        assert_eq!(w.len(), 4, "{w:?}");
        for flag in ["--chunk", "--threads", "--trt-cache", "--force"] {
            assert!(w.iter().any(|x| x.starts_with(flag)), "{flag}: {w:?}");
        }
        // On the CPU --threads matters; --device and --kernel-dir do not.
        let s = EmbedSettings::resolve(&parse(&[
            "a.fa",
            "-m",
            "m",
            "-o",
            "o.h5",
            "--threads",
            "4",
            "--device",
            "1",
            "--kernel-dir",
            "k",
        ]))
        .expect("resolves");
        let w = s.ineffective("cpu");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("--device") && w[1].starts_with("--kernel-dir"),
            "{w:?}"
        );
        // Defaults and flags that matter: no warning.
        let s =
            EmbedSettings::resolve(&parse(&["a.fa", "-m", "m", "-o", "o.h5", "--chunk", "300"]))
                .expect("resolves");
        assert!(s.ineffective("cpu").is_empty());
        assert!(s.ineffective("cuda").is_empty());
    }

    #[test]
    fn input_shard_from_yaml_or_flag_reaches_the_pipeline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("run.yaml");
        std::fs::write(
            &cfg,
            "inputs: [a.fa]\nmodel: m\nout: o.h5\ninput_shard: 1/4\n",
        )
        .expect("write");
        let path = cfg.to_str().expect("utf8");
        let s = EmbedSettings::resolve(&parse(&["--config", path])).expect("resolves");
        let want = InputShard { index: 1, count: 4 };
        assert_eq!(s.pipeline().input_shard, Some(want));
        let s = EmbedSettings::resolve(&parse(&["--config", path, "--input-shard", "3/4"]))
            .expect("resolves");
        assert_eq!(s.pipeline().input_shard.map(|x| x.index), Some(3));
        std::fs::write(
            &cfg,
            "inputs: [a.fa]\nmodel: m\nout: o.h5\ninput_shard: 4/4\n",
        )
        .expect("write");
        let e = EmbedSettings::resolve(&parse(&["--config", path])).expect_err("out of range");
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
        assert!(e.to_string().contains("I/N"), "{e}");
    }
}
