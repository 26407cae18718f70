//! The fp32 classifier against a float64 reference written here from VirNucPro's `MLPClassifier`
//! (Linear → BatchNorm1d eval → ReLU → Dropout no-op → Linear → softmax), batched equal to single
//! rows bit for bit, and refusal of inconsistent files.

use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;
use safetensors::tensor::TensorView;
use virnuc_predict::Classifier;
use virnuc_predict::classifier::label;

const H: usize = 64;
const ESM: usize = 40;
const IN: usize = 768 + ESM;

struct Weights {
    t: Vec<(&'static str, Vec<usize>, Vec<f32>)>,
}

fn weights(seed: u64) -> Weights {
    let mut rng = XorShiftRng::seed_from_u64(seed);
    let mut v = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..hi)).collect()
    };
    let a1 = (6.0 / (IN + H) as f32).sqrt();
    Weights {
        t: vec![
            ("hidden_layer.weight", vec![H, IN], v(H * IN, -a1, a1)),
            ("hidden_layer.bias", vec![H], v(H, -0.05, 0.05)),
            ("bn1.weight", vec![H], v(H, 0.8, 1.2)),
            ("bn1.bias", vec![H], v(H, -0.2, 0.2)),
            ("bn1.running_mean", vec![H], v(H, -0.3, 0.3)),
            ("bn1.running_var", vec![H], v(H, 0.3, 2.0)),
            ("output_layer.weight", vec![2, H], v(2 * H, -0.5, 0.5)),
            ("output_layer.bias", vec![2], v(2, -0.05, 0.05)),
        ],
    }
}

fn get<'a>(w: &'a Weights, name: &str) -> &'a [f32] {
    &w.t.iter().find(|t| t.0 == name).expect("tensor").2
}

fn write(dir: &Path, w: &Weights, json_edit: impl Fn(&mut serde_json::Value)) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        w.t.iter()
            .map(|(n, s, v)| {
                let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (n.to_string(), s.clone(), b)
            })
            .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let view = TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view");
            (n.clone(), view)
        })
        .collect();
    let st = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(dir.join("classifier.safetensors"), st).expect("write");
    let mut json = serde_json::json!({
        "format": "virnuc-trt-classifier/1",
        "input_dim": IN, "dnabert_dim": 768, "esm_dim": ESM, "hidden_dim": H, "num_classes": 2,
        "labels": ["others", "virus"], "feature_order": ["dnabert_s_mean", "esm2_mean"],
        "batch_norm_eps": 1e-5,
        "source": {"kind": "random", "path": null, "sha256": null, "seed": 1},
        "random_weights": true, "safetensors_sha256": "not checked here",
    });
    json_edit(&mut json);
    std::fs::write(dir.join("classifier.json"), json.to_string()).expect("write");
}

/// float64, straight from the module's definition (no folding).
fn reference(w: &Weights, x: &[f32]) -> [f64; 2] {
    let (w1, b1) = (get(w, "hidden_layer.weight"), get(w, "hidden_layer.bias"));
    let (g, b) = (get(w, "bn1.weight"), get(w, "bn1.bias"));
    let (mu, var) = (get(w, "bn1.running_mean"), get(w, "bn1.running_var"));
    let (w2, b2) = (get(w, "output_layer.weight"), get(w, "output_layer.bias"));
    let mut logits = [f64::from(b2[0]), f64::from(b2[1])];
    for j in 0..H {
        let mut h = f64::from(b1[j]);
        for k in 0..IN {
            h += f64::from(w1[j * IN + k]) * f64::from(x[k]);
        }
        let bn = (h - f64::from(mu[j])) / (f64::from(var[j]) + 1e-5).sqrt() * f64::from(g[j])
            + f64::from(b[j]);
        let r = bn.max(0.0);
        logits[0] += f64::from(w2[j]) * r;
        logits[1] += f64::from(w2[H + j]) * r;
    }
    let m = logits[0].max(logits[1]);
    let e = [(logits[0] - m).exp(), (logits[1] - m).exp()];
    [e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])]
}

#[test]
fn classifier_equals_float64_reference_and_batches_equal_single_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = weights(1);
    write(dir.path(), &w, |_| {});
    let c = Classifier::open(dir.path()).expect("opens");
    assert_eq!((c.input_dim(), c.esm_dim(), c.hidden_dim()), (IN, ESM, H));
    let mut rng = XorShiftRng::seed_from_u64(2);
    let n = 37;
    let x: Vec<f32> = (0..n * IN).map(|_| rng.random_range(-2.0..2.0)).collect();
    let batched = c.classify(&x);
    let mut worst = 0f64;
    let mut labels = [0; 2];
    for (i, p) in batched.iter().enumerate() {
        let row = &x[i * IN..(i + 1) * IN];
        let want = reference(&w, row);
        for k in 0..2 {
            worst = worst.max((f64::from(p[k]) - want[k]).abs());
        }
        // The same bits whatever else is in the batch (resume recomputes frames in other batches).
        let single = c.classify(row);
        assert_eq!(single[0].map(f32::to_bits), p.map(f32::to_bits), "row {i}");
        let tail = c.classify(&x[i * IN..]);
        assert_eq!(tail[0].map(f32::to_bits), p.map(f32::to_bits), "row {i}");
        labels[usize::from(label(*p) == "virus")] += 1;
    }
    assert!(worst < 1e-6, "max |fp32 - fp64| = {worst}");
    // Both classes occur: the comparison is not against a saturated softmax.
    assert!(labels[0] > 0 && labels[1] > 0, "{labels:?}");
    // Via the JSON or the safetensors path too.
    assert!(Classifier::open(&dir.path().join("classifier.json")).is_ok());
    assert!(Classifier::open(&dir.path().join("classifier.safetensors")).is_ok());
    assert!(c.check_models(768, ESM).is_ok());
    let e = c
        .check_models(768, 2560)
        .expect_err("3B width against a 40-wide classifier");
    assert!(e.contains("768 (DNABERT-S) + 2560 (ESM-2)"), "{e}");
}

#[test]
fn inconsistent_files_are_refused_with_the_reason() {
    let w = weights(3);
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: [(&str, Edit); 5] = [
        ("format", Box::new(|j| j["format"] = "other/1".into())),
        ("classes", Box::new(|j| j["num_classes"] = 3.into())),
        (
            "inconsistent dimensions",
            Box::new(|j| j["esm_dim"] = 41.into()),
        ),
        (
            "feature order",
            Box::new(|j| j["feature_order"] = serde_json::json!(["esm2_mean", "dnabert_s_mean"])),
        ),
        (
            "batch_norm_eps",
            Box::new(|j| j["batch_norm_eps"] = 0.0.into()),
        ),
    ];
    for (want, edit) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &w, edit);
        let e = Classifier::open(dir.path()).expect_err(want).to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    // A tensor whose shape disagrees with the JSON.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bad = weights(3);
    bad.t[6] = (
        "output_layer.weight",
        vec![2, H - 1],
        vec![0.0; 2 * (H - 1)],
    );
    write(dir.path(), &bad, |_| {});
    let e = Classifier::open(dir.path()).expect_err("shape").to_string();
    assert!(
        e.contains("output_layer.weight") && e.contains("expected F32 [2, 64]"),
        "{e}"
    );
    let e = Classifier::open(&dir.path().join("missing"))
        .expect_err("missing")
        .to_string();
    assert!(e.contains("cannot read"), "{e}");
}
