//! Acceptance of `build` + `gate` on the CPU (issue #5), with a random esm2_t6_8M exported by the
//! project's exporter through the venv's Python (`tools/test.sh` activates it):
//! - fp32 engine vs its fp32 export: passes, cosine 1 within rounding (nucleotide mode, autotuned);
//! - fp16 engine (re-exported by `build` from the fp32 export) vs the fp32 export: passes, and really
//!   differs from fp32 (the comparison is not vacuous);
//! - engine from a model with one weight tensor replaced: the gate fails;
//! - a forged GPU/CPU name in the manifest: a clear refusal, which `--force` overrides.
//!
//! Without Python and the exporter these tests fail loudly: they are the gate's proof.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use virnuc_build::autotune::SplitMix;
use virnuc_build::engine_build::{BuildOptions, CudaGraphMode, build_engine, check_engine_dir};
use virnuc_build::manifest::Manifest;
use virnuc_data::Mode;
use virnuc_engine::Ep;
use virnuc_gate::{GateOptions, GateReport, run_gate};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> String {
    std::env::var("VIRNUC_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run_python(args: &[&str]) {
    let out = Command::new(python())
        .args(args)
        .env("PYTHONPATH", root().join("export"))
        .env("VIRNUC_ROOT", root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): these tests need the project's Python venv \
                 (`source tools/setup.sh`, which tools/test.sh does)",
                python()
            )
        });
    assert!(
        out.status.success(),
        "{} {} failed: {}",
        python(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Shared fixtures: the fp32 export and two input files, made once per test process.
struct Fixtures {
    _dir: tempfile::TempDir,
    fp32: PathBuf,
    proteins: PathBuf,
    dna: PathBuf,
    work: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let fp32 = dir.path().join("t6_fp32");
        run_python(&[
            "-m",
            "virnuc_export",
            "--random",
            "esm2_t6_8M",
            "--seed",
            "11",
            "--attention",
            "masked",
            "--precision",
            "fp32",
            "--per-token",
            "--out",
            fp32.to_str().expect("utf-8 path"),
        ]);
        let mut rng = SplitMix::new(5);
        let aa = b"LAGVSERTIDPKQNFYMHWC";
        let mut proteins = String::new();
        for i in 0..30 {
            let len = rng.range(20, 200);
            let seq: String = (0..len).map(|_| aa[rng.range(0, 19)] as char).collect();
            proteins.push_str(&format!(">p{i}\n{seq}\n"));
        }
        // Contigs built from sense codons: frame F1 of every 500 bp chunk is stop-free and kept (random
        // DNA would have a stop in nearly every frame and give nothing to embed).
        let codons: Vec<[u8; 3]> = (0..64u8)
            .map(|c| {
                [
                    b"ACGT"[usize::from(c >> 4)],
                    b"ACGT"[usize::from((c >> 2) & 3)],
                    b"ACGT"[usize::from(c & 3)],
                ]
            })
            .filter(|c| !matches!(c, b"TAA" | b"TAG" | b"TGA"))
            .collect();
        let mut dna = String::new();
        for i in 0..14 {
            let n = rng.range(200, 500);
            let seq: String = (0..n)
                .flat_map(|_| codons[rng.range(0, codons.len() - 1)])
                .map(char::from)
                .collect();
            dna.push_str(&format!(">contig{i}\n{seq}\n"));
        }
        let p = dir.path().join("proteins.fa");
        let d = dir.path().join("contigs.fa");
        std::fs::write(&p, proteins).expect("write");
        std::fs::write(&d, dna).expect("write");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("mkdir");
        Fixtures {
            fp32,
            proteins: p,
            dna: d,
            work,
            _dir: dir,
        }
    })
}

fn build(model: &Path, out: &str, precision: Option<&str>, autotune: bool) -> Manifest {
    let f = fixtures();
    let mut o = BuildOptions::new(model, Ep::Cpu, f.work.join(out));
    o.precision = precision.map(str::to_string);
    o.exporter_dir = Some(root().join("export"));
    o.python = Some(python().into());
    o.cuda_graph = CudaGraphMode::Off;
    if autotune {
        o.budgets = vec![512, 1024];
        o.autotune_seconds = 0.2;
    } else {
        o.fixed_budget = Some(2048);
    }
    let mut log = Vec::new();
    let outcome = build_engine(&o, &mut |l| log.push(l.to_string()))
        .unwrap_or_else(|e| panic!("build {out}: {e}\n{}", log.join("\n")));
    outcome.manifest
}

fn gate(
    candidate: &Path,
    input: &Path,
    mode: Mode,
    force: bool,
) -> virnuc_gate::Result<GateReport> {
    let f = fixtures();
    let mut o = GateOptions::new(candidate, &f.fp32, input.to_path_buf());
    o.mode = mode;
    o.sample = 24;
    o.force = force;
    // Small packs: the masked attention of the test graph is O(T²).
    o.token_budget = Some(1026);
    run_gate(&o)
}

#[test]
fn fp32_engine_passes_against_its_export_with_cosine_one() {
    let f = fixtures();
    let manifest = build(&f.fp32, "fp32", None, true);
    assert_eq!(manifest.ep, "cpu");
    assert_eq!(manifest.precision, "fp32");
    assert_eq!(manifest.autotune.len(), 2, "{:?}", manifest.autotune);
    assert!(
        manifest
            .autotune
            .iter()
            .all(|r| r.tokens_per_s.is_some_and(|s| s > 0.0))
    );
    assert!([512, 1024].contains(&manifest.budget));
    assert!(!manifest.device.name.is_empty());
    let report = gate(&f.work.join("fp32"), &f.dna, Mode::Nucleotide, false).expect("gate runs");
    println!("{}", report.text());
    assert!(report.pass, "{}", report.text());
    assert_eq!(report.sequences, 24);
    assert!(report.min_cosine > 1.0 - 1e-6, "{}", report.text());
    // Both graphs output per-token states: they were compared too.
    assert!(
        report.max_abs_token_diff.is_some_and(|d| d < 1e-3),
        "{}",
        report.text()
    );
    assert_eq!(report.candidate.kind, "engine");
    assert_eq!(report.reference.kind, "model");
}

#[test]
fn fp16_engine_rebuilt_from_the_fp32_export_passes_and_really_differs() {
    let f = fixtures();
    let manifest = build(&f.fp32, "fp16", Some("fp16"), false);
    assert_eq!(manifest.precision, "fp16");
    let cmd = manifest
        .source
        .reexported_with
        .clone()
        .expect("re-exported");
    assert!(cmd.contains("--precision fp16"), "{cmd}");
    let report = gate(&f.work.join("fp16"), &f.proteins, Mode::Protein, false).expect("gate runs");
    println!("{}", report.text());
    assert!(report.pass, "{}", report.text());
    assert_eq!(report.candidate.precision, "fp16");
    assert_eq!(report.reference.precision, "fp32");
    // fp16 rounding is visible: the gate compared two different computations.
    assert!(report.max_abs_mean_diff > 1e-4, "{}", report.text());
    assert!(report.min_cosine < 1.0 - 1e-7, "{}", report.text());
}

#[test]
fn engine_from_a_model_with_one_weight_replaced_fails_the_gate() {
    let f = fixtures();
    let bad = f.work.join("perturbed_model");
    std::fs::create_dir_all(&bad).expect("mkdir");
    for name in ["model.onnx", "model.json"] {
        std::fs::copy(f.fp32.join(name), bad.join(name)).expect("copy");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/perturb_weight.py");
    run_python(&[
        script.to_str().expect("utf-8"),
        bad.to_str().expect("utf-8"),
        "--initializer",
        "l3.fc2.w",
    ]);
    build(&bad, "perturbed", None, false);
    let report =
        gate(&f.work.join("perturbed"), &f.proteins, Mode::Protein, false).expect("gate runs");
    println!("{}", report.text());
    assert!(!report.pass, "{}", report.text());
    assert!(
        report.failures.iter().any(|m| m.contains("min cosine")),
        "{:?}",
        report.failures
    );
    assert!(report.text().contains("GATE FAILED"));
}

#[test]
fn forged_device_name_is_refused_and_force_overrides() {
    let f = fixtures();
    build(&f.fp32, "forged", None, false);
    let dir = f.work.join("forged");
    let mut manifest = Manifest::read(&dir).expect("manifest");
    let real = manifest.device.name.clone();
    manifest.device.name = "NVIDIA Forged GPU 9000".into();
    manifest.write(&dir).expect("write");

    let e = check_engine_dir(&dir, None, None, false).expect_err("refused");
    let msg = e.to_string();
    assert!(msg.contains("NVIDIA Forged GPU 9000"), "{msg}");
    assert!(msg.contains(&real), "{msg}");
    assert!(msg.contains("--force"), "{msg}");

    let e = gate(&dir, &f.proteins, Mode::Protein, false).expect_err("gate refuses");
    assert!(e.to_string().contains("another device"), "{e}");

    let report = gate(&dir, &f.proteins, Mode::Protein, true).expect("forced");
    assert!(report.pass, "{}", report.text());
    assert_eq!(report.forced.len(), 1, "{:?}", report.forced);
    assert!(report.text().contains("forced past"));
}
