//! What `virnuc-trt build` is asked to do ([`BuildOptions`]) and the CUDA provider it builds with:
//! shared by [`crate::engine_build`] and [`crate::cuda_graph`], which thus need not import each other.

use std::path::PathBuf;

use ort::session::builder::GraphOptimizationLevel;
use virnuc_engine::{Ep, Result};

/// ONNX Runtime graph optimization applied offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptLevel {
    /// Copy the graph as exported (sessions still optimize at load).
    None,
    Basic,
    /// Basic + transformer fusions (SkipLayerNormalization, BiasGelu, attention); EP-specific but
    /// hardware-independent: the default.
    Extended,
    /// Extended + layout optimizations, tied to the CPU's instruction set.
    All,
}

impl OptLevel {
    pub fn name(self) -> &'static str {
        match self {
            OptLevel::None => "none",
            OptLevel::Basic => "basic",
            OptLevel::Extended => "extended",
            OptLevel::All => "all",
        }
    }
    pub(crate) fn ort(self) -> GraphOptimizationLevel {
        match self {
            OptLevel::None => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::All,
        }
    }
}

impl std::str::FromStr for OptLevel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "basic" => Ok(Self::Basic),
            "extended" => Ok(Self::Extended),
            "all" => Ok(Self::All),
            o => Err(format!(
                "unknown optimization level `{o}` (none, basic, extended, all)"
            )),
        }
    }
}

/// CUDA graph capture (CUDA EP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaGraphMode {
    Off,
    /// Measure with and without; keep it when it is faster by more than the noise.
    Measure,
    /// Keep it (still measured).
    On,
}

impl std::str::FromStr for CudaGraphMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "measure" | "auto" => Ok(Self::Measure),
            "on" => Ok(Self::On),
            o => Err(format!("unknown --cuda-graph `{o}` (off, measure, on)")),
        }
    }
}

/// Everything `build` needs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// A model folder or `.onnx` file (with its `model.json`).
    pub model: PathBuf,
    /// `fp16`/`fp32`; `None` keeps the export's.
    pub precision: Option<String>,
    pub ep: Ep,
    pub device_id: i32,
    pub out: PathBuf,
    pub ort_lib: Option<PathBuf>,
    pub opt_level: OptLevel,
    /// Candidate token budgets; empty = [`crate::autotune::default_budgets`].
    pub budgets: Vec<usize>,
    /// Skip the autotune and record this budget.
    pub fixed_budget: Option<usize>,
    /// Seconds of timing per candidate.
    pub autotune_seconds: f64,
    pub cuda_graph: CudaGraphMode,
    /// Python interpreter for a re-export (default: `VIRNUC_PYTHON`, else `python3`).
    pub python: Option<PathBuf>,
    /// Folder holding the `virnuc_export` package (default: `$VIRNUC_ROOT/export`, else found upward).
    pub exporter_dir: Option<PathBuf>,
    /// TensorRT: `libvirnuc_varlen_trt.so` for `virnuc` attention.
    pub trt_plugin: Option<PathBuf>,
    /// TensorRT: dump an EP-context model.
    pub trt_ep_context: bool,
    pub intra_threads: usize,
    /// Replace an existing engine folder.
    pub overwrite: bool,
    /// Folder of `varlen_attention.fatbin` for `virnuc` attention on cuda/tensorrt (`None`: see
    /// [`virnuc_engine::kernel_dir::resolve_kernel_dir`]).
    pub kernel_dir: Option<PathBuf>,
}

impl BuildOptions {
    pub fn new(model: impl Into<PathBuf>, ep: Ep, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            precision: None,
            ep,
            device_id: 0,
            out: out.into(),
            ort_lib: None,
            opt_level: OptLevel::Extended,
            budgets: Vec::new(),
            fixed_budget: None,
            autotune_seconds: 3.0,
            cuda_graph: CudaGraphMode::Measure,
            python: None,
            exporter_dir: None,
            trt_plugin: None,
            trt_ep_context: true,
            intra_threads: 0,
            overwrite: false,
            kernel_dir: None,
        }
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_provider(
    device_id: i32,
    cuda_graph: bool,
) -> Result<Vec<ort::ep::ExecutionProviderDispatch>> {
    Ok(vec![
        ort::ep::CUDA::default()
            .with_device_id(device_id)
            .with_cuda_graph(cuda_graph)
            .build()
            .error_on_failure(),
    ])
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_provider(
    _device_id: i32,
    _cuda_graph: bool,
) -> Result<Vec<ort::ep::ExecutionProviderDispatch>> {
    Err(virnuc_engine::EngineError::NotEnabled(
        "the CUDA execution provider",
        "cuda",
    ))
}
