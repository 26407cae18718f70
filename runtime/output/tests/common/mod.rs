//! Shared by the integration tests: configs, synthetic runs and the independent h5py check.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use virnuc_output::{EmbeddingWriter, OutputConfig, OutputDtype, synthetic};

pub fn config(path: &Path, hidden: usize, dtype: OutputDtype, per_token: bool) -> OutputConfig {
    OutputConfig {
        path: path.to_path_buf(),
        hidden_size: hidden,
        per_token,
        dtype,
        attributes: vec![
            (
                "model".into(),
                r#"{"name": "synthetic", "hidden_size": 16}"#.into(),
            ),
            ("precision".into(), format!("{dtype:?}").to_lowercase()),
            ("execution_provider".into(), "none".into()),
            ("random_weights".into(), "true".into()),
        ],
        resume: false,
        shard_sequences: 100,
    }
}

/// Writes every pack of `packs` not already done; returns the writer unfinished.
pub fn write_packs(writer: &mut EmbeddingWriter, packs: &[Vec<u64>], hidden: usize) {
    let done = writer.done();
    for pack in packs {
        let todo: Vec<u64> = pack.iter().copied().filter(|&i| !done(i)).collect();
        if todo.is_empty() {
            continue;
        }
        let (metas, mean, states, cu) = synthetic::pack(&todo, hidden);
        writer
            .write_pack(&metas, &mean, Some((&states, &cu)))
            .expect("pack written");
    }
}

/// A complete synthetic output.
pub fn write_file(config: OutputConfig, n: u64, seed: u64, max_pack: usize) {
    let hidden = config.hidden_size;
    let mut writer = EmbeddingWriter::open(config).expect("opens");
    write_packs(
        &mut writer,
        &synthetic::ffd_order(n, 256, max_pack, seed),
        hidden,
    );
    writer.finish(n).expect("finishes");
}

/// The venv's Python (h5py, numpy), set up by `tools/setup.sh`.
pub fn python() -> PathBuf {
    let root = std::env::var_os("VIRNUC_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} not found: run `source tools/setup.sh` (the h5py check is part of the test suite)",
        python.display()
    );
    python
}

/// Opens `path` with h5py and recomputes every value (`tests/check_h5.py`); panics on a mismatch.
pub fn h5py_check(path: &Path, n: u64, hidden: usize, dtype: OutputDtype, per_token: bool) {
    let result = h5py_check_result(path, n, hidden, dtype, per_token);
    assert!(
        result.is_ok(),
        "h5py check of {}: {result:?}",
        path.display()
    );
}

pub fn h5py_check_result(
    path: &Path,
    n: u64,
    hidden: usize,
    dtype: OutputDtype,
    per_token: bool,
) -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_h5.py");
    let out = Command::new(python())
        .arg(script)
        .arg(path)
        .arg(n.to_string())
        .arg(hidden.to_string())
        .arg(match dtype {
            OutputDtype::F32 => "f32",
            OutputDtype::F16 => "f16",
        })
        .arg(if per_token { "per-token" } else { "mean-only" })
        .output()
        .expect("python runs");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Peak resident set (VmHWM) of this process, bytes (Linux).
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM line");
    kb * 1024
}
