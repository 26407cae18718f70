use ort::ep::{CUDA, TensorRT};
use virnuc_core::ModelMetadata;

use crate::cuda::CudaEngine;
use crate::model::ModelFiles;
use crate::runtime::OrtLibrary;
use crate::{Engine, EngineOptions, Result};

/// TensorRT options for a packed ESM-2 graph: fp16 when the graph is fp16, engine and timing caches
/// in `trt_cache_dir` (an engine build takes minutes per model and GPU), layer norms kept in fp32.
pub(crate) fn trt_provider(options: &EngineOptions, metadata: &ModelMetadata) -> TensorRT {
    let mut trt = TensorRT::default()
        .with_device_id(options.device_id)
        .with_fp16(metadata.precision == "fp16")
        .with_layer_norm_fp32_fallback(true);
    if let Some(dir) = &options.trt_cache_dir {
        let dir = dir.display().to_string();
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(&dir)
            .with_timing_cache(true)
            .with_timing_cache_path(&dir);
    }
    trt
}

/// TensorRT first; the CUDA provider takes the nodes TensorRT does not (both must register).
/// The data path (pinned buffers, IoBinding) is the CUDA engine's.
pub(crate) fn open(
    options: &EngineOptions,
    files: &ModelFiles,
    metadata: ModelMetadata,
    library: &OrtLibrary,
) -> Result<Box<dyn Engine>> {
    let eps = vec![
        trt_provider(options, &metadata).build(),
        CUDA::default().with_device_id(options.device_id).build(),
    ];
    let engine = CudaEngine::open_with(options, files, metadata, library, "tensorrt", eps)?;
    Ok(Box::new(engine))
}
