//! Helpers shared by the CLI integration tests: running the binary and exporting a random model with
//! the venv's Python (tools/test.sh activates it; `VIRNUC_PYTHON` overrides the interpreter).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `virnuc-trt ARGS` with extra environment variables.
pub fn virnuc_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_virnuc-trt"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run virnuc-trt")
}

/// Status, stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exports esm2_t6_8M with random weights (`seed`, masked attention) into `dir`.
pub fn export_random_t6(dir: &Path, seed: u64) {
    let python = std::env::var("VIRNUC_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-m", "virnuc_export", "--random", "esm2_t6_8M", "--seed"])
        .arg(seed.to_string())
        .args(["--attention", "masked", "--out"])
        .arg(dir)
        .env("PYTHONPATH", root().join("export"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e}): source tools/setup.sh first"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
