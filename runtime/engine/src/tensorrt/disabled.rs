use virnuc_core::ModelMetadata;

use crate::model::ModelFiles;
use crate::runtime::OrtLibrary;
use crate::{Engine, EngineError, EngineOptions, Result};

pub(crate) fn open(
    _options: &EngineOptions,
    _files: &ModelFiles,
    _metadata: ModelMetadata,
    _library: &OrtLibrary,
) -> Result<Box<dyn Engine>> {
    Err(EngineError::NotEnabled(
        "the TensorRT execution provider",
        "tensorrt",
    ))
}
