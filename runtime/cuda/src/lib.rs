//! The `com.virnuc:VarlenAttention` CUDA kernel at run time.
//!
//! * [`VarlenKernels`] reads the fatbin that `plugins/varlen_attention/build.sh` builds
//!   (`build/varlen_attention/varlen_attention.fatbin`: sm_80 and sm_90 machine code plus PTX),
//!   loads it through the CUDA driver API — libcuda opened at run time, so this crate builds on
//!   machines with neither a GPU nor CUDA — and launches it on a caller's stream.
//! * [`cuda_operator_domain`] wraps it as an ONNX Runtime custom op for the CUDA execution
//!   provider (device pointers in and out, the EP's compute stream).
//!
//! Everything that can be checked without a GPU is pure and tested here: validation of shapes
//! and attributes ([`Problem::validate`]) and the launch geometry ([`launch_config`]). Contract
//! version 2: the ALiBi mode (`alibi_slopes`) runs the `virnuc_varlen_attention_alibi_*` kernels,
//! the slopes passed by value ([`AlibiSlopes`], at most [`MAX_ALIBI_HEADS`] heads).
//!
//! ```
//! use virnuc_cuda::{Attributes, DType, Problem};
//! let attrs = Attributes { num_heads: 20, ..Attributes::default() };
//! // ESM-2 650M: 20 heads of 64, a pack of 3 sequences, 100 tokens.
//! let p = Problem::validate(&attrs, DType::F16, &[100, 3 * 20 * 64], &[4], Some(&[100])).unwrap();
//! assert_eq!((p.head_dim, p.batch, p.scale), (64, 3, 0.125));
//! let missing = virnuc_cuda::VarlenKernels::open(std::path::Path::new("/nonexistent"));
//! assert!(missing.unwrap_err().to_string().contains("plugins/varlen_attention/build.sh"));
//! ```

mod driver;
mod geometry;
mod ort_op;

use std::path::PathBuf;

pub use driver::{
    DEFAULT_KERNEL_DIR, DevicePointers, FATBIN_NAME, VarlenKernels, ensure_driver,
    launch_varlen_attention,
};
pub use geometry::{
    AlibiSlopes, Attributes, DType, HEAD_DIMS, LaunchConfig, MAX_ALIBI_HEADS, Problem, block_shape,
    kernel_name, launch_config,
};
pub use ort_op::{
    CUDA_EP, DOMAIN, OP_TYPE, VarlenAttentionCuda, add_cuda_operators, cuda_operator_domain,
};

/// Version of the op contract this crate implements (`VARLEN_ATTENTION_VERSION` in the README).
pub const VARLEN_ATTENTION_VERSION: &str = "2";

/// Why the CUDA path cannot run.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "VarlenAttention CUDA kernel not built: cannot read {path}: {source} \
         (run `bash plugins/varlen_attention/build.sh`, or point the kernel directory at its output)"
    )]
    NotBuilt {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the CUDA driver library (libcuda.so.1) could not be loaded: no NVIDIA driver on this machine, \
         or it is not on the library search path (LD_LIBRARY_PATH)"
    )]
    NoDriver,
    #[error(
        "no CUDA context is current on this thread (the kernel launches into the caller's context)"
    )]
    NoContext,
    #[error("CUDA driver call {what} failed: {message}")]
    Driver { what: &'static str, message: String },
    #[error("VarlenAttention: {0}")]
    Invalid(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fatbin_names_the_build_command() {
        let dir = std::env::temp_dir().join("virnuc-cuda-no-such-dir");
        let err = VarlenKernels::open(&dir)
            .expect_err("nothing there")
            .to_string();
        assert!(err.contains("varlen_attention.fatbin"), "{err}");
        assert!(
            err.contains("bash plugins/varlen_attention/build.sh"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_fatbin_is_refused() {
        let dir = std::env::temp_dir().join(format!("virnuc-cuda-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join(FATBIN_NAME), b"not a fatbin at all, just text").expect("write");
        let err = VarlenKernels::open(&dir)
            .expect_err("bad magic")
            .to_string();
        assert!(err.contains("not a CUDA fatbin"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Opens the real artifact when build.sh has run (tools/test.sh runs it first).
    #[test]
    fn built_fatbin_opens_when_present() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(DEFAULT_KERNEL_DIR);
        if dir.join(FATBIN_NAME).is_file() {
            let k = VarlenKernels::open(&dir).expect("built fatbin opens");
            assert!(k.path().ends_with(FATBIN_NAME));
        }
    }

    #[test]
    fn launch_refuses_bad_arguments_before_any_driver_call() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(DEFAULT_KERNEL_DIR);
        let Ok(k) = VarlenKernels::open(&dir) else {
            return;
        };
        let p = Problem {
            total_tokens: 4,
            batch: 1,
            num_heads: 1,
            head_dim: 48,
            dtype: DType::F16,
            scale: 0.1,
            rotary: true,
            rotary_base: 10000.0,
            alibi: None,
        };
        let ptrs = DevicePointers {
            qkv: 1,
            cu_seqlens: 1,
            position_ids: 1,
            out: 1,
        };
        // SAFETY: rejected before any pointer is used.
        let err = unsafe { k.launch(std::ptr::null_mut(), &p, &ptrs) }
            .expect_err("D=48")
            .to_string();
        assert!(err.contains("head_dim 48"), "{err}");
        let p = Problem { head_dim: 64, ..p };
        let null = DevicePointers {
            position_ids: 0,
            ..ptrs
        };
        // SAFETY: rejected before any pointer is used.
        let err = unsafe { k.launch(std::ptr::null_mut(), &p, &null) }
            .expect_err("null")
            .to_string();
        assert!(err.contains("null device pointer"), "{err}");
    }

    #[test]
    fn without_a_driver_the_error_says_so() {
        // On a machine with the NVIDIA driver this passes trivially; on CI (no driver) it checks
        // the loud failure instead of cudarc's panic.
        match ensure_driver() {
            Ok(()) => {}
            Err(e) => assert!(e.to_string().contains("libcuda.so.1"), "{e}"),
        }
    }
}
