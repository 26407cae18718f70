//! Building engines: a packed-graph export → an engine folder for one GPU model (or CPU) and one
//! ONNX Runtime (`virnuc-trt build`), and what checks such a folder before a run.
//!
//! This crate sits above [`virnuc_engine`], which runs packed graphs (sessions, execution
//! providers, the `VarlenAttention` ops): building opens engines to time them, running never needs
//! the build. Modules:
//!
//! * [`engine_build`]: [`build_engine`] (offline graph optimization, re-export at another
//!   precision, autotune, manifest written last) and [`check_engine_dir`];
//! * [`options`]: what a build is asked to do ([`BuildOptions`]) and the CUDA provider it uses;
//! * [`autotune`]: the token budget measured on the device;
//! * [`cuda_graph`]: CUDA-graph capture measured against plain runs (CUDA builds);
//! * [`trt_config`]: the TensorRT EP's options (caches, profiles, plugin);
//! * [`manifest`]: the engine manifest and the host check against it.
//!
//! ```
//! use virnuc_build::{BuildOptions, CudaGraphMode};
//! let options = BuildOptions::new("out/demo/model", virnuc_engine::Ep::Cpu, "engines/demo-cpu");
//! assert_eq!(options.cuda_graph, CudaGraphMode::Measure);
//! assert!(options.budgets.is_empty()); // autotune::default_budgets
//! ```

pub mod autotune;
mod cuda_graph;
pub mod engine_build;
pub mod manifest;
pub mod options;
pub mod trt_config;

pub use engine_build::{BuildOutcome, build_engine, check_engine_dir};
pub use options::{BuildOptions, CudaGraphMode, OptLevel};
