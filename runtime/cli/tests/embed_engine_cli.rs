//! `virnuc-trt embed --engine DIR`: the manifest's tuned budget is the default --toks-per-batch,
//! a manifest that does not match the host is refused unless --force (which warns), and the
//! engine's embeddings are those of the plain --model run. Needs the venv's Python for the export
//! (tools/test.sh activates it).

mod common;

use std::path::Path;
use std::process::Output;

use common::{export_random_t6, text, virnuc_with_env};

fn virnuc(args: &[&str]) -> Output {
    virnuc_with_env(args, &[])
}

fn report(path: &Path) -> serde_json::Value {
    let t = std::fs::read_to_string(path).expect("report");
    serde_json::from_str(&t).expect("report JSON")
}

#[test]
fn embed_engine_uses_manifest_budget_and_refuses_forged_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    export_random_t6(&model, 5);
    let m = model.to_str().expect("utf-8");
    let engine = dir.path().join("engine");
    let e = engine.to_str().expect("utf-8");
    // 1030: neither the CPU default (2048) nor the GPU one (16384).
    let o = virnuc(&[
        "build", "--model", m, "--ep", "cpu", "--out", e, "--budget", "1030",
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let fasta = dir.path().join("p.fa");
    std::fs::write(
        &fasta,
        ">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMSEQNNTEMTFQIQRIYTKDIS\n>c\nMVLSPADKTNVKAAW\n",
    )
    .expect("fasta");
    let f = fasta.to_str().expect("utf-8");
    let run = |name: &str, extra: &[&str]| {
        let h5 = dir.path().join(format!("{name}.h5"));
        let rep = dir.path().join(format!("{name}.json"));
        let mut args = vec![
            "embed",
            f,
            "--mode",
            "protein",
            "-q",
            "--out",
            h5.to_str().expect("utf-8"),
            "--report",
            rep.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        (virnuc(&args), rep)
    };

    let (o, rep) = run("engine", &["--engine", e]);
    assert!(o.status.success(), "{}", text(&o));
    let r = report(&rep);
    assert_eq!(r["token_budget"], 1030, "{r}");
    assert_eq!(r["sequences"], 3, "{r}");

    // An explicit budget still wins over the manifest's.
    let (o, rep) = run("explicit", &["--engine", e, "--toks-per-batch", "900"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(report(&rep)["token_budget"], 900);

    // --engine and --model together are a usage error.
    let (o, _) = run("both", &["--engine", e, "--model", m]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // A provider other than the engine's is a usage error, not a quiet switch.
    let (o, _) = run("other-ep", &["--engine", e, "--ep", "cuda"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("built for cpu"),
        "{}",
        text(&o)
    );

    // A manifest from another host (another ONNX Runtime version): refused, then forced with a warning.
    let path = engine.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("manifest")).expect("json");
    manifest["ort_version"] = "0.0.0-forged".into();
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&manifest).expect("json"),
    )
    .expect("write");
    let (o, _) = run("forged", &["--engine", e]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ONNX Runtime version"), "{}", text(&o));
    assert!(err.contains("0.0.0-forged"), "{}", text(&o));
    let (o, rep) = run("forced", &["--engine", e, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning: --force"), "{}", text(&o));
    assert!(err.contains("0.0.0-forged"), "{}", text(&o));
    assert_eq!(report(&rep)["token_budget"], 1030);
}
