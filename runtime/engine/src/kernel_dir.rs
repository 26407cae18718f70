//! Where the VarlenAttention CUDA kernel (`varlen_attention.fatbin`) is looked for, and its
//! registration on CUDA/TensorRT sessions of `virnuc`-flavor models.

use std::path::{Path, PathBuf};

/// Environment variable naming the kernel folder (below `--kernel-dir`, above the defaults).
pub const KERNEL_DIR_ENV: &str = "VIRNUC_KERNEL_DIR";
/// The fatbin's file name inside the kernel folder (same as `virnuc_cuda::FATBIN_NAME`).
pub const FATBIN_FILE: &str = "varlen_attention.fatbin";
/// Repository-relative output of `plugins/varlen_attention/build.sh` (`virnuc_cuda::DEFAULT_KERNEL_DIR`).
pub const REPO_KERNEL_DIR: &str = "build/varlen_attention";

/// The kernel folder: `explicit` (`--kernel-dir`), else `env` (`$VIRNUC_KERNEL_DIR`, when not
/// empty), else `<exe_dir>/varlen_attention` when it holds the fatbin (an installed binary ships
/// the kernel beside it), else [`REPO_KERNEL_DIR`] relative to the working directory. The last
/// one is returned even when missing, so the error names the build command and that path.
pub fn resolve_kernel_dir(
    explicit: Option<&Path>,
    env: Option<&str>,
    exe_dir: Option<&Path>,
) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return PathBuf::from(e);
    }
    if let Some(d) = exe_dir {
        let beside = d.join("varlen_attention");
        if beside.join(FATBIN_FILE).is_file() {
            return beside;
        }
    }
    PathBuf::from(REPO_KERNEL_DIR)
}

/// [`resolve_kernel_dir`] with this process's environment and executable.
pub fn kernel_dir_for(explicit: Option<&Path>) -> PathBuf {
    let env = std::env::var(KERNEL_DIR_ENV).ok();
    let exe = std::env::current_exe().ok();
    resolve_kernel_dir(
        explicit,
        env.as_deref(),
        exe.as_deref().and_then(Path::parent),
    )
}

/// Adds the CUDA VarlenAttention kernels to the session's `com.virnuc` domain (which already holds
/// the CPU op, so nodes ONNX Runtime places on the CPU still run).
#[cfg(feature = "cuda")]
pub fn add_cuda_op(
    domain: ort::operator::OperatorDomain,
    explicit: Option<&Path>,
    ep: &'static str,
) -> crate::Result<ort::operator::OperatorDomain> {
    let dir = kernel_dir_for(explicit);
    virnuc_cuda::add_cuda_operators(domain, &dir).map_err(|e| crate::EngineError::Provider {
        ep,
        reason: format!(
            "the model uses the `virnuc` attention flavor, whose CUDA kernel is needed: {e} \
             (kernel folder {}: --kernel-dir or ${KERNEL_DIR_ENV})",
            dir.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_flag_env_exe_repo() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let exe = tmp.path();
        let flag = Path::new("/k/flag");
        assert_eq!(
            resolve_kernel_dir(Some(flag), Some("/k/env"), Some(exe)),
            flag
        );
        assert_eq!(
            resolve_kernel_dir(None, Some("/k/env"), Some(exe)),
            Path::new("/k/env")
        );
        // An empty variable counts as unset.
        assert_eq!(
            resolve_kernel_dir(None, Some(""), Some(exe)),
            Path::new(REPO_KERNEL_DIR)
        );
        // Beside the executable only when the fatbin is there.
        std::fs::create_dir(exe.join("varlen_attention")).expect("mkdir");
        assert_eq!(
            resolve_kernel_dir(None, None, Some(exe)),
            Path::new(REPO_KERNEL_DIR)
        );
        std::fs::write(exe.join("varlen_attention").join(FATBIN_FILE), b"x").expect("write");
        assert_eq!(
            resolve_kernel_dir(None, None, Some(exe)),
            exe.join("varlen_attention")
        );
        assert_eq!(
            resolve_kernel_dir(None, None, None),
            Path::new(REPO_KERNEL_DIR)
        );
    }

    /// A missing kernel is a provider error naming the folder, the build command and the flag
    /// (the session is never built with the CPU op alone on a GPU provider).
    #[cfg(feature = "cuda")]
    #[test]
    fn missing_fatbin_is_a_clear_provider_error() {
        crate::runtime::init(None).expect("ONNX Runtime (source tools/setup.sh)");
        let domain = crate::custom_op::domain().expect("CPU domain");
        let dir = Path::new("/nonexistent/virnuc-kernels");
        let Err(err) = add_cuda_op(domain, Some(dir), "cuda") else {
            panic!("a kernel folder without the fatbin was accepted");
        };
        let msg = err.to_string();
        assert!(
            matches!(err, crate::EngineError::Provider { ep: "cuda", .. }),
            "{msg}"
        );
        for needle in [
            "/nonexistent/virnuc-kernels",
            "plugins/varlen_attention/build.sh",
            "--kernel-dir",
            KERNEL_DIR_ENV,
        ] {
            assert!(msg.contains(needle), "{needle} missing from: {msg}");
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn constants_match_virnuc_cuda() {
        assert_eq!(FATBIN_FILE, virnuc_cuda::FATBIN_NAME);
        assert_eq!(REPO_KERNEL_DIR, virnuc_cuda::DEFAULT_KERNEL_DIR);
    }
}
