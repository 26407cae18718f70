//! The TensorRT execution provider. Built only with the `tensorrt` feature (ripgrep's
//! `enabled.rs` / `disabled.rs` swap): without it, asking for TensorRT says "not enabled in this
//! build" instead of failing to compile. TensorRT itself (libnvinfer) is loaded by ONNX Runtime at run
//! time; it was not available where this was developed, so this path is built but not run here.

#[cfg(all(feature = "tensorrt", feature = "cuda"))]
mod enabled;
#[cfg(all(feature = "tensorrt", feature = "cuda"))]
pub(crate) use enabled::open;

#[cfg(not(all(feature = "tensorrt", feature = "cuda")))]
mod disabled;
#[cfg(not(all(feature = "tensorrt", feature = "cuda")))]
pub(crate) use disabled::open;
