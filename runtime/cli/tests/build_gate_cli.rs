//! `virnuc-trt build` and `virnuc-trt gate` as a CI job runs them: exit status 0 on pass and 1 on
//! fail, the JSON report, the thresholds file, and the clear errors (existing engine folder, no
//! Python for a re-export). Needs the venv's Python for the export (tools/test.sh activates it).

mod common;

use common::{export_random_t6, text, virnuc_with_env as virnuc};

#[test]
fn build_then_gate_exit_codes_reports_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    export_random_t6(&model, 3);
    let m = model.to_str().expect("utf-8");
    let engine = dir.path().join("engine");
    let e = engine.to_str().expect("utf-8");

    let o = virnuc(
        &[
            "build", "--model", m, "--ep", "cpu", "--out", e, "--budget", "1026",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("budget 1026"),
        "{}",
        text(&o)
    );
    assert!(engine.join("manifest.json").is_file());

    // An existing engine is not overwritten silently (exit 5: an engine-folder error).
    let o = virnuc(
        &[
            "build", "--model", m, "--ep", "cpu", "--out", e, "--budget", "1026",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--overwrite"),
        "{}",
        text(&o)
    );

    // A re-export without Python names the exact command to run.
    let o = virnuc(
        &[
            "build",
            "--model",
            m,
            "--ep",
            "cpu",
            "--out",
            e,
            "--overwrite",
            "--precision",
            "fp16",
            "--budget",
            "1026",
        ],
        &[("VIRNUC_PYTHON", "/nonexistent/python3")],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Run the export yourself"), "{}", text(&o));
    assert!(
        err.contains("-m virnuc_export --random esm2_t6_8M --seed 3"),
        "{}",
        text(&o)
    );
    assert!(err.contains("--precision fp16"), "{}", text(&o));
    assert!(
        !engine.join("manifest.json").exists(),
        "a failed rebuild leaves no manifest"
    );

    let o = virnuc(
        &[
            "build",
            "--model",
            m,
            "--ep",
            "cpu",
            "--out",
            e,
            "--overwrite",
            "--budget",
            "1026",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));

    let fasta = dir.path().join("p.fa");
    std::fs::write(
        &fasta,
        ">a\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>b\nMSDNGPQNQRNAPRITFGGPSDSTGSNQNGERS\n>c\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF\n",
    )
    .expect("write");
    let f = fasta.to_str().expect("utf-8");
    let json = dir.path().join("gate.json");
    let j = json.to_str().expect("utf-8");
    let gate = |extra: &[&str]| {
        let mut args = vec![
            "gate",
            "--candidate",
            e,
            "--reference",
            m,
            "--input",
            f,
            "--mode",
            "protein",
            "--json",
            j,
        ];
        args.extend_from_slice(extra);
        virnuc(&args, &[])
    };
    let o = gate(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("GATE PASSED"),
        "{}",
        text(&o)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("valid JSON");
    assert_eq!(report["pass"], true);
    assert_eq!(report["sequences"], 3);

    // Thresholds from a file: asking for more sequences than the sample fails the gate → exit 1.
    let yaml = dir.path().join("t.yaml");
    std::fs::write(&yaml, "min_cosine: 0.999\nmin_sequences: 1000\n").expect("write");
    let o = gate(&["--thresholds", yaml.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("GATE FAILED"),
        "{}",
        text(&o)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("valid JSON");
    assert_eq!(report["pass"], false);

    // A typo in the thresholds file is a usage error (exit 2), never a looser gate.
    std::fs::write(&yaml, "min_cosin: 0.5\n").expect("write");
    let o = gate(&["--thresholds", yaml.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("min_cosin"),
        "{}",
        text(&o)
    );
}
