//! `virnuc-trt build`: an export → an engine folder for this GPU (or CPU) and ONNX Runtime (see
//! `docs/engines.md`). The work is `virnuc_build::engine_build::build_engine`; this is its command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use virnuc_build::engine_build::{BuildOptions, CudaGraphMode, OptLevel, build_engine};
use virnuc_engine::Ep;

use crate::settings::{MAX_DEVICE, Machine, check_range, max_toks_per_batch, usage};

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The export to build from: a folder with model.onnx + model.json, or a .onnx file.
    #[arg(long, value_name = "DIR|FILE.onnx")]
    pub model: PathBuf,
    /// Engine precision. A different precision than the export's re-exports the model from the
    /// source recorded in its metadata (`python -m virnuc_export`). [default: the export's]
    #[arg(long, value_parser = ["fp16", "fp32"])]
    pub precision: Option<String>,
    /// Execution provider the engine is built and tuned for.
    #[arg(long, value_parser = ["cpu", "cuda", "tensorrt"])]
    pub ep: String,
    /// GPU index.
    #[arg(long, default_value_t = 0)]
    pub device: i32,
    /// Engine folder to write (model.onnx, model.json, manifest.json, trt/).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace an existing engine folder.
    #[arg(long)]
    pub overwrite: bool,
    /// ONNX Runtime graph optimization saved offline (none, basic, extended, all).
    #[arg(long, default_value = "extended")]
    pub opt_level: OptLevel,
    /// Candidate token budgets for the autotune, comma-separated.
    /// [default: 4096,8192,16384,32768,65536 on a GPU; 1024,2048,4096,8192 on the CPU; smaller
    /// for the O(T²) `masked` flavor]
    #[arg(long, value_delimiter = ',')]
    pub budgets: Vec<usize>,
    /// Skip the autotune and record this budget.
    #[arg(long, conflicts_with = "budgets")]
    pub budget: Option<usize>,
    /// Seconds of timing per candidate budget.
    #[arg(long, default_value_t = 3.0)]
    pub autotune_seconds: f64,
    /// CUDA graph capture on the CUDA EP: measure (on/off, keep it only if faster), on, off.
    #[arg(long, default_value = "measure")]
    pub cuda_graph: CudaGraphMode,
    /// Python interpreter for a re-export.
    #[arg(long, env = "VIRNUC_PYTHON")]
    pub python: Option<PathBuf>,
    /// Folder holding the `virnuc_export` package. [default: $VIRNUC_ROOT/export]
    #[arg(long, value_name = "DIR")]
    pub exporter: Option<PathBuf>,
    /// TensorRT: the VarlenAttention plugin (plugins/varlen_attention/tensorrt builds
    /// libvirnuc_varlen_trt.so); needed for `virnuc` attention graphs.
    #[arg(long, value_name = "FILE.so")]
    pub trt_plugin: Option<PathBuf>,
    /// TensorRT: do not dump an EP-context model (model_ctx.onnx).
    #[arg(long)]
    pub no_ep_context: bool,
    /// ONNX Runtime intra-op threads (CPU EP); 0 = ONNX Runtime's default.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The ONNX Runtime shared library.
    #[arg(long, env = "ORT_DYLIB_PATH", value_name = "FILE")]
    pub ort_lib: Option<PathBuf>,
    /// Folder of varlen_attention.fatbin (`virnuc` attention on cuda/tensorrt). [default:
    /// $VIRNUC_KERNEL_DIR, else varlen_attention/ beside the binary, else build/varlen_attention]
    #[arg(long, value_name = "PATH")]
    pub kernel_dir: Option<PathBuf>,
}

/// Longest autotune per candidate budget, in seconds.
const MAX_AUTOTUNE_SECONDS: f64 = 600.0;

/// The numeric flags against their ranges, before any work.
fn check_ranges(args: &BuildArgs) -> anyhow::Result<()> {
    let m = Machine::this();
    check_range("--device", args.device, 0, MAX_DEVICE, "GPU index")?;
    let max = max_toks_per_batch(&m);
    let why = "tokens: one residue with <cls> and <eos>, up to what the memory holds";
    for &b in args.budgets.iter().chain(&args.budget) {
        check_range(
            if args.budget.is_some() {
                "--budget"
            } else {
                "--budgets"
            },
            b,
            3,
            max,
            why,
        )?;
    }
    if !args.autotune_seconds.is_finite() {
        return usage(format!(
            "--autotune-seconds {} is not a number of seconds",
            args.autotune_seconds
        ));
    }
    check_range(
        "--autotune-seconds",
        args.autotune_seconds,
        0.01,
        MAX_AUTOTUNE_SECONDS,
        "seconds of timing per candidate budget",
    )?;
    let per_core = format!(
        "0 = ONNX Runtime's choice; at most 4 per core of the {} here",
        m.cores
    );
    check_range("--threads", args.threads, 0, m.max_threads(), &per_core)
}

pub fn run(args: &BuildArgs) -> anyhow::Result<()> {
    check_ranges(args)?;
    let ep: Ep = args.ep.parse().map_err(anyhow::Error::msg)?;
    let mut o = BuildOptions::new(&args.model, ep, &args.out);
    o.precision = args.precision.clone();
    o.device_id = args.device;
    o.ort_lib = args.ort_lib.clone();
    o.opt_level = args.opt_level;
    o.budgets = args.budgets.clone();
    o.fixed_budget = args.budget;
    o.autotune_seconds = args.autotune_seconds;
    o.cuda_graph = args.cuda_graph;
    o.python = args.python.clone();
    o.exporter_dir = args.exporter.clone();
    o.trt_plugin = args.trt_plugin.clone();
    o.trt_ep_context = !args.no_ep_context;
    o.intra_threads = args.threads;
    o.overwrite = args.overwrite;
    o.kernel_dir = args.kernel_dir.clone();
    // A folder this build creates is removed again when it fails: no half-built engine folder is
    // left for a later `embed --engine` or `build` to trip over. A folder that existed is the
    // user's and stays (the build removes its old engine files first).
    let created = !args.out.exists();
    let built = build_engine(&o, &mut |line| eprintln!("virnuc-trt build: {line}"));
    if built.is_err()
        && created
        && args.out.exists()
        && let Err(e) = std::fs::remove_dir_all(&args.out)
    {
        eprintln!(
            "virnuc-trt build: warning: cannot remove the unfinished engine folder {}: {e}",
            args.out.display()
        );
    }
    let outcome = built.with_context(|| {
        format!(
            "building an engine from {} into {}",
            args.model.display(),
            args.out.display()
        )
    })?;
    let m = &outcome.manifest;
    println!(
        "{}: {} {} engine for {} ({}), budget {}{}",
        outcome.dir.display(),
        m.model_name,
        m.precision,
        m.device.name,
        m.ep,
        m.budget,
        if m.cuda_graph.enabled {
            ", CUDA graphs"
        } else {
            ""
        }
    );
    Ok(())
}
