//! Finding and loading the ONNX Runtime shared library (`load-dynamic`: nothing is linked or
//! downloaded at build time).
//!
//! Order: the `--ort-lib` flag, then `ORT_DYLIB_PATH` (exported by `tools/setup.sh`, pointing into the
//! venv's `onnxruntime` 1.31.1 wheel), then `/opt/onnxruntime-gpu/lib/libonnxruntime.so` (the GPU
//! machine's install), then `libonnxruntime.so` next to the executable.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::{EngineError, Result};

/// The environment variable naming the library (the same one `ort` itself reads).
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";
/// Where the GPU machine's `onnxruntime-gpu` wheel is installed.
pub const GPU_DEFAULT: &str = "/opt/onnxruntime-gpu/lib/libonnxruntime.so";

/// The loaded library.
#[derive(Debug, Clone)]
pub struct OrtLibrary {
    pub path: PathBuf,
    /// e.g. `1.31.1`, from ONNX Runtime's build info.
    pub version: String,
}

/// Which file would be loaded, and how it was chosen; an error lists every place looked at.
pub fn resolve_library(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return existing(p, "--ort-lib");
    }
    if let Some(p) = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty()) {
        return existing(Path::new(&p), ORT_DYLIB_ENV);
    }
    let mut tried = vec![PathBuf::from(GPU_DEFAULT)];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        tried.push(dir.join("libonnxruntime.so"));
    }
    for p in &tried {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    Err(EngineError::Library(format!(
        "ONNX Runtime shared library not found: pass --ort-lib PATH or set {ORT_DYLIB_ENV} \
         (`source tools/setup.sh` sets it to the venv's onnxruntime wheel); looked at {}",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn existing(p: &Path, source: &str) -> Result<PathBuf> {
    if p.is_file() {
        Ok(p.to_path_buf())
    } else {
        Err(EngineError::Library(format!(
            "ONNX Runtime shared library {} (from {source}) does not exist",
            p.display()
        )))
    }
}

struct Loaded {
    env: Environment,
    library: OrtLibrary,
}

static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();

/// Loads the library once per process and creates the one ONNX Runtime environment.
/// A second call with another library is an error (a process can hold only one).
pub fn init(flag: Option<&Path>) -> Result<OrtLibrary> {
    let wanted = resolve_library(flag)?;
    let loaded = LOADED.get_or_init(|| {
        let builder = ort::init_from(&wanted)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", wanted.display()))?;
        let env = builder
            .with_name("virnuc-trt")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))?;
        Ok(Loaded {
            env,
            library: OrtLibrary {
                path: wanted.clone(),
                version: version_of(&wanted, ort::info()),
            },
        })
    });
    match loaded {
        Ok(l) if same_file(&l.library.path, &wanted) => Ok(l.library.clone()),
        Ok(l) => Err(EngineError::Library(format!(
            "ONNX Runtime is already loaded from {} in this process; cannot switch to {}",
            l.library.path.display(),
            wanted.display()
        ))),
        Err(e) => Err(EngineError::Library(e.clone())),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// The environment made by [`init`] (an error before `init`), for the sessions this crate and the
/// engine build create.
pub fn environment() -> Result<&'static Environment> {
    match LOADED.get() {
        Some(Ok(l)) => Ok(&l.env),
        _ => Err(EngineError::Library(
            "ONNX Runtime is not loaded (call runtime::init first)".into(),
        )),
    }
}

/// The library's version: from its file name (`libonnxruntime.so.1.31.1`, symlinks followed), else
/// from the build info (`git-branch=rel-1.31.1`), else the build info itself.
fn version_of(path: &Path, info: &str) -> String {
    let from_name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("libonnxruntime.so."))
            .filter(|v| v.split('.').all(|d| d.parse::<u32>().is_ok()))
            .map(str::to_string)
    };
    from_name(path)
        .or_else(|| path.canonicalize().ok().and_then(|p| from_name(&p)))
        .or_else(|| {
            info.split([',', ' '])
                .find_map(|part| part.strip_prefix("git-branch=rel-"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("unknown ({})", info.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_read_from_the_file_name_or_build_info() {
        let info = "ORT Build Info: git-branch=HEAD, git-commit-id=6af1a93, build type=Release";
        assert_eq!(
            version_of(Path::new("/x/libonnxruntime.so.1.31.1"), info),
            "1.31.1"
        );
        assert_eq!(
            version_of(
                Path::new("/nonexistent/libonnxruntime.so"),
                "ORT Build Info: git-branch=rel-1.30.0, x"
            ),
            "1.30.0"
        );
        assert!(
            version_of(Path::new("/nonexistent/libonnxruntime.so"), info).starts_with("unknown")
        );
    }

    #[test]
    fn a_flag_pointing_nowhere_is_a_clear_error() {
        let err = resolve_library(Some(Path::new("/nonexistent/libonnxruntime.so")))
            .expect_err("missing file");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libonnxruntime.so"), "{msg}");
        assert!(msg.contains("--ort-lib"), "{msg}");
    }
}
