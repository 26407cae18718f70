//! What `embed` and `translate` tell the user about their input: the one-line summary of everything
//! the run changed in or left out of it, warnings for flags that do nothing, a mode mismatch refused.
//! The `embed` cases need the venv's Python for the export (tools/test.sh activates it).

mod common;

use std::path::Path;

use common::{export_random_t6, text, virnuc_with_env};

/// Duplicate id, empty id, a record without sequence, a space in a sequence line, a chunk whose six
/// frames all have a stop (TTAGCTAGTTAAT: LAS*, *LVN, S*L, IN*L, LTS*, *LA).
const ALTERED: &[u8] = b">a\nATGGCCAAA\n>a\nATG GCC\n>\nATGGCC\n>e\n>s\nTTAGCTAGTTAAT\n";
const SUMMARY: &str = "virnuc-trt: note: input changed: 1 duplicate id, 1 empty id, 1 record without \
                       sequence skipped, 1 space/tab removed from sequence lines, 1 chunk with no \
                       stop-free frame (nothing embedded for them)\n";

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p.to_str().expect("utf-8").to_string()
}

#[test]
fn regression_translate_names_data_altering_events_and_useless_flags_on_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = write(dir.path(), "alt.fa", ALTERED);
    let o = virnuc_with_env(&["translate", &f], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stderr), SUMMARY, "{}", text(&o));
    // --chunk in protein mode: said once.
    let p = write(dir.path(), "p.fa", b">p\nMKTAYIAKQRQISFVKSHFSRQ\n");
    let o = virnuc_with_env(
        &["translate", &p, "--mode", "protein", "--chunk", "300"],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.matches("warning: --chunk has no effect").count(),
        1,
        "{err}"
    );
}

#[test]
fn regression_embed_names_data_altering_events_warns_and_refuses_a_mode_mismatch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    export_random_t6(&model, 3);
    let m = model.to_str().expect("utf-8");
    let f = write(dir.path(), "alt.fa", ALTERED);
    let out = dir.path().join("o.h5");
    let rep = dir.path().join("o.json");
    let o = virnuc_with_env(
        &[
            "embed",
            &f,
            "--model",
            m,
            "--ep",
            "cpu",
            "-q",
            "--device",
            "1",
            "--out",
            out.to_str().expect("utf-8"),
            "--report",
            rep.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.matches("virnuc-trt: note: input changed:").count(),
        1,
        "{err}"
    );
    assert!(err.contains(SUMMARY), "{err}");
    assert_eq!(
        err.matches("warning: --device has no effect").count(),
        1,
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rep).expect("report")).expect("json");
    assert_eq!(report["data"]["whitespace_removed"], 1);
    assert_eq!(report["data"]["empty_ids"], 1);
    assert_eq!(report["data"]["stages"]["chunks_without_frame"], 1);

    // Proteins in the default nucleotide mode: refused, the flag named, nothing written.
    let globins = common::root().join("tests/fixtures/globins45.fa");
    let out2 = dir.path().join("mismatch.h5");
    let o = virnuc_with_env(
        &[
            "embed",
            globins.to_str().expect("utf-8"),
            "--model",
            m,
            "--ep",
            "cpu",
            "-q",
            "--out",
            out2.to_str().expect("utf-8"),
        ],
        &[],
    );
    // Exit 3: an input error.
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--mode protein") && err.contains("globins45.fa"),
        "{err}"
    );
    assert!(!out2.exists());
}
