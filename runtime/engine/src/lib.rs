//! Inference engines for packed ESM-2 graphs: ONNX Runtime through the `ort` crate, with the CPU,
//! CUDA and TensorRT execution providers, and the `com.virnuc:VarlenAttention` CPU custom op (and
//! the CUDA one's registration). This crate runs packed graphs; building engine folders (offline
//! optimization, autotune, manifest) is the `virnuc-build` crate above it.
//!
//! The shape follows Hugging Face text-embeddings-inference: a small [`Engine`] trait taking the
//! shared [`PackedBatch`], engines behind Cargo features (`cuda`, `tensorrt`; a build without one
//! still compiles and says "not enabled in this build"), and an [`EngineThread`] that owns the engine
//! on its own OS thread so that the loader and the writer overlap compute.
//!
//! ```no_run
//! use virnuc_core::{PackedBatch, SequenceMeta, alphabet};
//! use virnuc_engine::{Ep, EngineOptions, open_engine};
//! # fn main() -> Result<(), virnuc_engine::EngineError> {
//! let options = EngineOptions::new("out/demo/model", Ep::Cpu);
//! let mut engine = open_engine(&options)?;
//! let mut batch = PackedBatch::default();
//! batch.push(SequenceMeta { index: 0, record: 0, id: "p".into(), residues: 2 }, &[alphabet::CLS, 5, 6, alphabet::EOS]);
//! let out = engine.embed(&batch)?;
//! assert_eq!(out.mean.len(), out.hidden_size);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use virnuc_core::{ModelMetadata, PackedBatch};

pub mod custom_op;
pub mod kernel_dir;
mod model;
mod ort_engine;
pub mod runtime;
mod tensorrt;
mod thread;
pub mod varlen;

#[cfg(feature = "cuda")]
mod cuda;

pub use model::{ModelFiles, check_graph_against_metadata, check_session, sha256_file};
pub use runtime::{OrtLibrary, resolve_library};
pub use thread::{EngineThread, EngineThreadStats, Job, JobResult};

/// Errors of the engine crate. Each says which file or which step failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("{0}")]
    Library(String),
    /// The model folder/file or its metadata is missing or inconsistent.
    #[error("{0}")]
    Model(String),
    /// The asked execution provider cannot be used (never silently replaced by the CPU).
    #[error("execution provider {ep}: {reason}")]
    Provider { ep: &'static str, reason: String },
    /// A feature compiled out of this build.
    #[error("{0} is not enabled in this build (rebuild virnuc-engine with the `{1}` feature)")]
    NotEnabled(&'static str, &'static str),
    /// ONNX Runtime failed while creating the session or running a pack.
    #[error("{context}: {source}")]
    Ort {
        context: String,
        #[source]
        source: ort::Error,
    },
    /// The pack handed to the engine breaks the graph's contract.
    #[error("invalid pack: {0}")]
    Batch(String),
    /// The engine thread stopped.
    #[error("engine thread: {0}")]
    Thread(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Attaches context to an ONNX Runtime error: the `EngineError::Ort` of a failed step (also used by
/// the engine build, `virnuc-build`).
pub trait OrtContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, R> OrtContext<T> for std::result::Result<T, ort::Error<R>> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| EngineError::Ort {
            context: context(),
            source: ort::Error::new(e.message().to_string()),
        })
    }
}

/// Execution provider to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ep {
    Cpu,
    Cuda,
    TensorRt,
    /// CUDA when it can be registered and a session created, else CPU (the choice is reported).
    Auto,
}

impl Ep {
    pub fn name(self) -> &'static str {
        match self {
            Ep::Cpu => "cpu",
            Ep::Cuda => "cuda",
            Ep::TensorRt => "tensorrt",
            Ep::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Ep {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Ep::Cpu),
            "cuda" => Ok(Ep::Cuda),
            "tensorrt" | "trt" => Ok(Ep::TensorRt),
            "auto" => Ok(Ep::Auto),
            other => Err(format!(
                "unknown execution provider `{other}` (cpu, cuda, tensorrt, auto)"
            )),
        }
    }
}

/// Everything needed to open an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A model folder (`model.onnx` + `model.json`) or a `.onnx` file with its `model.json` beside it.
    pub model: PathBuf,
    pub ep: Ep,
    /// `--ort-lib`: the ONNX Runtime shared library (else `ORT_DYLIB_PATH`, else the defaults).
    pub ort_lib: Option<PathBuf>,
    pub device_id: i32,
    /// ONNX Runtime intra-op threads (CPU EP); 0 = ONNX Runtime's default.
    pub intra_threads: usize,
    /// Ask for the per-token output (`hidden`); the graph must have it.
    pub per_token: bool,
    /// Skip the sha256 check of the `.onnx` file against the metadata.
    pub skip_hash: bool,
    /// TensorRT: where engines and timing caches go.
    pub trt_cache_dir: Option<PathBuf>,
    /// `--kernel-dir`: folder of `varlen_attention.fatbin` for `virnuc`-flavor models on CUDA or
    /// TensorRT (else `$VIRNUC_KERNEL_DIR`, else beside the binary, else `build/varlen_attention`;
    /// see [`kernel_dir::resolve_kernel_dir`]).
    pub kernel_dir: Option<PathBuf>,
}

impl EngineOptions {
    pub fn new(model: impl Into<PathBuf>, ep: Ep) -> Self {
        Self {
            model: model.into(),
            ep,
            ort_lib: None,
            device_id: 0,
            intra_threads: 0,
            per_token: false,
            skip_hash: false,
            trt_cache_dir: None,
            kernel_dir: None,
        }
    }
}

/// The result of one pack, in pack order (`mean[i]` belongs to `batch.sequences[i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// `[B, H]` row-major.
    pub mean: Vec<f32>,
    /// `[T, H]` row-major per-token states when asked for.
    pub hidden: Option<Vec<f32>>,
    pub hidden_size: usize,
    /// Time spent inside the ONNX Runtime run call (device time plus launch overhead).
    pub compute: Duration,
}

/// What an open engine runs.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// `cpu`, `cuda` or `tensorrt`: the provider actually registered.
    pub ep: &'static str,
    /// Why this provider was chosen (with `auto`) — e.g. "CUDA unavailable: …, running on CPU".
    pub ep_note: Option<String>,
    pub metadata: ModelMetadata,
    pub model_path: PathBuf,
    pub ort_library: PathBuf,
    pub ort_version: String,
    pub hidden_size: usize,
    pub per_token: bool,
}

/// An inference engine: packed batch in, pooled (and optionally per-token) embeddings out.
pub trait Engine: Send + std::fmt::Debug {
    fn embed(&mut self, batch: &PackedBatch) -> Result<Embeddings>;
    fn info(&self) -> &EngineInfo;
    /// Runs a pack of `tokens` tokens once so that allocations and kernel choices happen before the
    /// timed work (TEI's warm-up at the largest batch).
    fn warmup(&mut self, tokens: usize) -> Result<()> {
        // ESM-2's longest sequence; families without a limit warm up on sequences of that size too.
        let longest = self.info().metadata.model.max_residues.unwrap_or(1022);
        let batch = warmup_batch(tokens, longest as usize);
        self.embed(&batch).map(|_| ())
    }
}

/// A pack of `tokens` tokens made of sequences of at most `max_residues` residues.
pub fn warmup_batch(tokens: usize, max_residues: usize) -> PackedBatch {
    use virnuc_core::{SequenceMeta, alphabet};
    let mut batch = PackedBatch::default();
    let max_len = max_residues.max(1) + 2;
    let mut left = tokens.max(3);
    let mut index = 0;
    while left >= 3 {
        let len = left.min(max_len);
        let mut toks = vec![5u8; len];
        toks[0] = alphabet::CLS;
        toks[len - 1] = alphabet::EOS;
        batch.push(
            SequenceMeta {
                index,
                record: 0,
                id: format!("warmup{index}"),
                residues: (len - 2) as u32,
            },
            &toks,
        );
        index += 1;
        left -= len;
    }
    batch
}

/// Opens the engine for `options.ep`, checking the model against its metadata first.
///
/// With [`Ep::Cuda`] or [`Ep::TensorRt`], a provider that cannot be registered is an error naming the
/// reason; only [`Ep::Auto`] falls back to the CPU, and says so in [`EngineInfo::ep_note`].
pub fn open_engine(options: &EngineOptions) -> Result<Box<dyn Engine>> {
    let library = runtime::init(options.ort_lib.as_deref())?;
    let files = ModelFiles::locate(&options.model)?;
    let metadata = files.load_metadata(options.skip_hash)?;
    match options.ep {
        Ep::Cpu => Ok(Box::new(ort_engine::OrtEngine::open_cpu(
            options, &files, metadata, &library,
        )?)),
        Ep::Cuda => open_cuda(options, &files, metadata, &library, None),
        Ep::TensorRt => tensorrt::open(options, &files, metadata, &library),
        Ep::Auto => match open_cuda(options, &files, metadata.clone(), &library, None) {
            Ok(engine) => Ok(engine),
            Err(e @ (EngineError::Provider { .. } | EngineError::NotEnabled(..))) => {
                let mut engine =
                    ort_engine::OrtEngine::open_cpu(options, &files, metadata, &library)?;
                engine.set_note(format!("auto: CUDA not usable ({e}); running on CPU"));
                Ok(Box::new(engine))
            }
            Err(e) => Err(e),
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(
    options: &EngineOptions,
    files: &ModelFiles,
    metadata: ModelMetadata,
    library: &OrtLibrary,
    note: Option<String>,
) -> Result<Box<dyn Engine>> {
    let mut engine = cuda::CudaEngine::open(options, files, metadata, library)?;
    if let Some(note) = note {
        engine.set_note(note);
    }
    Ok(Box::new(engine))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    _options: &EngineOptions,
    _files: &ModelFiles,
    _metadata: ModelMetadata,
    _library: &OrtLibrary,
    _note: Option<String>,
) -> Result<Box<dyn Engine>> {
    Err(EngineError::NotEnabled(
        "the CUDA execution provider",
        "cuda",
    ))
}

/// Path of a model's `.onnx` file, for messages.
pub fn display_path(p: &Path) -> String {
    p.display().to_string()
}
