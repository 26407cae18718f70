//! The engine on real exported graphs (esm2_t6_8M, random weights) with the CPU provider.
//!
//! Needs the project environment (`source tools/setup.sh`: `ORT_DYLIB_PATH` and the venv's
//! `python` with the exporter's dependencies); `tools/test.sh` provides it. Without it these tests
//! fail with a message saying so — they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use virnuc_core::{PackedBatch, SequenceMeta, alphabet};
use virnuc_engine::{EngineError, EngineOptions, Ep, open_engine};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Exports `esm2_t6_8M` (seed 0) once per test process per (flavor, precision).
fn model(flavor: &str, precision: &str) -> PathBuf {
    static DONE: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let done = DONE.get_or_init(|| Mutex::new(Vec::new()));
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{flavor}-{precision}");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("engine-models")
        .join(&key);
    if !done.contains(&key) {
        assert!(
            std::env::var_os("ORT_DYLIB_PATH").is_some(),
            "ORT_DYLIB_PATH is not set: run through tools/test.sh or `source tools/setup.sh` first"
        );
        let status = Command::new("python")
            .current_dir(repo().join("export"))
            .args([
                "-m",
                "virnuc_export",
                "--random",
                "esm2_t6_8M",
                "--seed",
                "0",
                "--attention",
                flavor,
                "--precision",
                precision,
                "--out",
            ])
            .arg(&dir)
            .status()
            .expect(
                "python not found: `source tools/setup.sh` (the venv) before running these tests",
            );
        assert!(status.success(), "exporter failed for {key}");
        done.push(key);
    }
    dir
}

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Random protein sequences (standard residues, ids 4..=23), lengths from `lengths`.
fn proteins(lengths: &[usize], seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Lcg(seed);
    lengths
        .iter()
        .map(|&l| {
            let mut t = vec![alphabet::CLS];
            t.extend((0..l).map(|_| 4 + rng.below(20) as u8));
            t.push(alphabet::EOS);
            t
        })
        .collect()
}

fn pack(seqs: &[Vec<u8>]) -> PackedBatch {
    let mut b = PackedBatch::default();
    for (i, s) in seqs.iter().enumerate() {
        b.push(
            SequenceMeta {
                index: i as u64,
                record: 0,
                id: format!("s{i}"),
                residues: (s.len() - 2) as u32,
            },
            s,
        );
    }
    b
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let norm = b.iter().map(|x| f64::from(x.abs())).fold(0.0, f64::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()) / norm)
        .fold(0.0, f64::max)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

const LENGTHS: [usize; 9] = [1, 2, 17, 160, 3, 90, 1, 45, 300];

#[test]
fn packed_equals_per_sequence_and_virnuc_op_equals_masked() {
    let seqs = proteins(&LENGTHS, 11);
    let mut masked =
        open_engine(&EngineOptions::new(model("masked", "fp32"), Ep::Cpu)).expect("masked engine");
    let mut virnuc =
        open_engine(&EngineOptions::new(model("virnuc", "fp32"), Ep::Cpu)).expect("virnuc engine");
    assert_eq!(masked.info().ep, "cpu");
    let h = masked.info().hidden_size;
    let packed_m = masked.embed(&pack(&seqs)).expect("masked packed");
    let packed_v = virnuc.embed(&pack(&seqs)).expect("virnuc packed");
    assert_eq!(packed_m.mean.len(), seqs.len() * h);
    // The CPU VarlenAttention op against the standard-ops flavor on the same weights.
    let err = max_rel(&packed_v.mean, &packed_m.mean);
    assert!(err <= 1e-5, "virnuc vs masked: {err}");
    for (i, s) in seqs.iter().enumerate() {
        let single = masked
            .embed(&pack(std::slice::from_ref(s)))
            .expect("single");
        let row = &packed_m.mean[i * h..(i + 1) * h];
        let err = max_rel(row, &single.mean);
        assert!(err <= 1e-5, "sequence {i}: packed vs alone {err}");
        let single_v = virnuc
            .embed(&pack(std::slice::from_ref(s)))
            .expect("single");
        let err = max_rel(&packed_v.mean[i * h..(i + 1) * h], &single_v.mean);
        assert!(err <= 1e-5, "virnuc sequence {i}: packed vs alone {err}");
    }
    // The comparison can fail: a different sequence's embedding is far away.
    assert!(max_rel(&packed_m.mean[..h], &packed_m.mean[h..2 * h]) > 1e-2);
}

#[test]
fn fp16_graph_runs_the_fp16_op_close_to_fp32() {
    let seqs = proteins(&[5, 120, 33, 1], 5);
    let mut f32e =
        open_engine(&EngineOptions::new(model("virnuc", "fp32"), Ep::Cpu)).expect("fp32");
    let mut f16e =
        open_engine(&EngineOptions::new(model("virnuc", "fp16"), Ep::Cpu)).expect("fp16");
    let a = f32e.embed(&pack(&seqs)).expect("fp32 run");
    let b = f16e.embed(&pack(&seqs)).expect("fp16 run");
    let h = a.hidden_size;
    for i in 0..seqs.len() {
        let c = cosine(&a.mean[i * h..(i + 1) * h], &b.mean[i * h..(i + 1) * h]);
        assert!(c >= 0.999, "sequence {i}: cosine {c}");
    }
}

#[test]
fn cuda_on_a_machine_without_it_is_a_provider_error_not_a_cpu_run() {
    let err = open_engine(&EngineOptions::new(model("masked", "fp32"), Ep::Cuda))
        .expect_err("no CUDA here");
    assert!(
        matches!(err, EngineError::Provider { ep: "cuda", .. }),
        "{err}"
    );
    // auto says why it fell back.
    let auto = open_engine(&EngineOptions::new(model("masked", "fp32"), Ep::Auto)).expect("auto");
    assert_eq!(auto.info().ep, "cpu");
    let note = auto.info().ep_note.clone().unwrap_or_default();
    assert!(note.contains("CUDA"), "{note}");
}

#[test]
fn mismatching_metadata_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = model("masked", "fp32");
    let other = model("virnuc", "fp32");
    // Graph from one export, metadata from another: the sha256 differs.
    std::fs::copy(other.join("model.onnx"), dir.path().join("model.onnx")).expect("copy");
    std::fs::copy(src.join("model.json"), dir.path().join("model.json")).expect("copy");
    let err = open_engine(&EngineOptions::new(dir.path(), Ep::Cpu)).expect_err("sha mismatch");
    assert!(err.to_string().contains("sha256"), "{err}");

    // Metadata that disagrees with the graph's outputs (hash check off to reach the graph check).
    std::fs::copy(src.join("model.onnx"), dir.path().join("model.onnx")).expect("copy");
    let text = std::fs::read_to_string(src.join("model.json")).expect("read");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["outputs"][0]["name"] = "pooled".into();
    std::fs::write(dir.path().join("model.json"), json.to_string()).expect("write");
    let mut options = EngineOptions::new(dir.path(), Ep::Cpu);
    options.skip_hash = true;
    let err = open_engine(&options).expect_err("outputs differ");
    assert!(err.to_string().contains("mismatch"), "{err}");

    // Per-token asked of a graph without `hidden`.
    let mut options = EngineOptions::new(src, Ep::Cpu);
    options.per_token = true;
    let err = open_engine(&options).expect_err("no hidden output");
    assert!(err.to_string().contains("hidden"), "{err}");
}

#[test]
fn malformed_packs_are_refused_before_onnx_runtime() {
    let mut e = open_engine(&EngineOptions::new(model("masked", "fp32"), Ep::Cpu)).expect("engine");
    let mut b = pack(&proteins(&[4, 4], 1));
    b.input_ids[2] = 99;
    assert!(matches!(e.embed(&b), Err(EngineError::Batch(_))));
    assert!(matches!(
        e.embed(&PackedBatch::default()),
        Err(EngineError::Batch(_))
    ));
}

#[test]
fn engine_thread_returns_results_in_order_with_busy_time() {
    let (thread, results) = virnuc_engine::EngineThread::spawn(
        EngineOptions::new(model("virnuc", "fp32"), Ep::Cpu),
        Some(256),
        2,
    )
    .unwrap_or_else(|e| panic!("engine thread did not start: {e}"));
    let consumer = std::thread::spawn(move || {
        results
            .iter()
            .map(|r| r.expect("pack ok").batch.sequences[0].id.clone())
            .collect::<Vec<_>>()
    });
    for k in 0..5u64 {
        let mut b = pack(&proteins(&[10, 20], k));
        b.sequences[0].id = format!("pack{k}");
        thread.submit(b).expect("submit");
    }
    let stats = thread.finish().expect("stats");
    let ids = consumer.join().expect("consumer");
    assert_eq!(ids, (0..5).map(|k| format!("pack{k}")).collect::<Vec<_>>());
    assert_eq!(stats.packs, 5);
    assert!(stats.busy_s > 0.0 && stats.busy_fraction() <= 1.0);
}
