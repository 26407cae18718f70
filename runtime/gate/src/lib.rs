//! The accuracy gate: embed a sample of sequences with a candidate engine (typically FP16) and a
//! reference (FP32 engine or export), compare, and pass or fail against thresholds.
//!
//! Compared per sequence: the cosine similarity of the mean embeddings (what downstream classifiers
//! consume) and their largest absolute difference; over all tokens, the largest absolute difference
//! of the per-token states when both graphs output them. The verdict ([`evaluate`]) is a pure
//! function of the statistics and the [`Thresholds`] (defaults: every sequence ≥ 0.99, mean ≥ 0.999),
//! which a CI job reads from YAML.
//!
//! ```
//! use virnuc_gate::{Stats, Thresholds, evaluate};
//! let mut stats = Stats::default();
//! stats.add_pack(&["a".into(), "b".into()], &[1.0, 0.0, 0.0, 1.0], &[1.0, 0.0, 0.0, 1.0], 2);
//! assert!(evaluate(&stats, &Thresholds::default()).is_empty());
//! stats.add_pack(&["c".into()], &[1.0, 0.0], &[0.0, 1.0], 2);
//! assert_eq!(evaluate(&stats, &Thresholds::default()).len(), 2);
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virnuc_build::engine_build::check_engine_dir;
use virnuc_build::manifest::MANIFEST_FILE;
use virnuc_core::{PackedBatch, SequenceMeta};
use virnuc_data::{Mode, PipelineConfig};
use virnuc_engine::{EngineOptions, Ep, ModelFiles, open_engine};

/// Errors of the gate (a failed comparison is not an error: it is a report with `pass: false`).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("{0}")]
    Engine(#[from] virnuc_engine::EngineError),
    #[error("{0}")]
    Data(#[from] virnuc_data::DataError),
    #[error("thresholds {path}: {message}")]
    Thresholds { path: String, message: String },
    #[error("{0}")]
    Mismatch(String),
}

pub type Result<T, E = GateError> = std::result::Result<T, E>;

/// Pass criteria. In YAML: `min_cosine: 0.99`, `mean_cosine: 0.999`, optionally
/// `max_abs_token_diff: 0.05` and `min_sequences: 100`; unknown keys are errors (a typo must not
/// silently loosen the gate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Lowest per-sequence cosine of mean embeddings allowed.
    pub min_cosine: f64,
    /// Lowest average cosine allowed.
    pub mean_cosine: f64,
    /// Largest per-token absolute difference allowed (checked when both graphs have per-token states).
    pub max_abs_token_diff: Option<f64>,
    /// Fewest sequences compared for a verdict.
    pub min_sequences: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_cosine: 0.99,
            mean_cosine: 0.999,
            max_abs_token_diff: None,
            min_sequences: 1,
        }
    }
}

impl Thresholds {
    pub fn from_yaml_str(text: &str) -> std::result::Result<Self, String> {
        let t: Self = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        let unit = |x: f64| (-1.0..=1.0).contains(&x);
        if !unit(t.min_cosine) || !unit(t.mean_cosine) {
            return Err("min_cosine and mean_cosine must be within [-1, 1]".into());
        }
        if t.max_abs_token_diff.is_some_and(|d| !at_least(d, 0.0)) {
            return Err("max_abs_token_diff must be ≥ 0".into());
        }
        Ok(t)
    }

    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let err = |message: String| GateError::Thresholds {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_yaml_str(&text).map_err(err)
    }
}

/// Cosine similarity in f64; NaN when either vector is zero or not finite (and NaN fails the gate).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 || a.len() != b.len() {
        return f64::NAN;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Largest absolute elementwise difference; NaN when any element is NaN or the lengths differ.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let mut m = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (f64::from(x) - f64::from(y)).abs();
        if d.is_nan() {
            return f64::NAN;
        }
        m = m.max(d);
    }
    m
}

/// One compared sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceResult {
    pub id: String,
    pub cosine: f64,
    pub max_abs_diff: f64,
}

/// Running comparison statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub sequences: Vec<SequenceResult>,
    pub tokens: usize,
    /// Largest per-token absolute difference (when per-token states were compared).
    pub max_abs_token_diff: Option<f64>,
}

impl Stats {
    /// Adds a pack's mean embeddings (`[B, H]` row-major each, same order).
    pub fn add_pack(&mut self, ids: &[String], reference: &[f32], candidate: &[f32], h: usize) {
        for (i, id) in ids.iter().enumerate() {
            let r = &reference[i * h..(i + 1) * h];
            let c = &candidate[i * h..(i + 1) * h];
            self.sequences.push(SequenceResult {
                id: id.clone(),
                cosine: cosine(r, c),
                max_abs_diff: max_abs_diff(r, c),
            });
        }
    }

    /// Adds a pack's per-token states.
    pub fn add_tokens(&mut self, reference: &[f32], candidate: &[f32]) {
        let d = max_abs_diff(reference, candidate);
        self.max_abs_token_diff = Some(match self.max_abs_token_diff {
            Some(m) if m.is_nan() || d.is_nan() => f64::NAN,
            Some(m) => m.max(d),
            None => d,
        });
    }

    /// Lowest cosine (NaN when any is NaN).
    pub fn min_cosine(&self) -> f64 {
        if self.sequences.is_empty() {
            return f64::NAN;
        }
        self.sequences
            .iter()
            .map(|s| s.cosine)
            .fold(f64::INFINITY, |m, c| {
                if c.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.min(c)
                }
            })
    }

    pub fn mean_cosine(&self) -> f64 {
        if self.sequences.is_empty() {
            return f64::NAN;
        }
        self.sequences.iter().map(|s| s.cosine).sum::<f64>() / self.sequences.len() as f64
    }

    pub fn max_abs_mean_diff(&self) -> f64 {
        self.sequences
            .iter()
            .map(|s| s.max_abs_diff)
            .fold(0.0, |m, d| {
                if d.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(d)
                }
            })
    }

    /// The `n` sequences with the lowest cosine (NaN first).
    pub fn worst(&self, n: usize) -> Vec<SequenceResult> {
        let mut v = self.sequences.clone();
        v.sort_by(|a, b| match (a.cosine.is_nan(), b.cosine.is_nan()) {
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            _ => a.cosine.total_cmp(&b.cosine),
        });
        v.truncate(n);
        v
    }
}

/// `x >= threshold`, false when either is NaN (a NaN statistic must fail the gate, never pass it).
fn at_least(x: f64, threshold: f64) -> bool {
    x >= threshold
}

/// Why the gate fails; empty = pass. Every comparison is written so that NaN fails.
pub fn evaluate(stats: &Stats, t: &Thresholds) -> Vec<String> {
    let mut failures = Vec::new();
    let n = stats.sequences.len();
    if n < t.min_sequences.max(1) {
        failures.push(format!(
            "{n} sequences compared, at least {} needed",
            t.min_sequences.max(1)
        ));
    }
    let min = stats.min_cosine();
    if n > 0 && !at_least(min, t.min_cosine) {
        let worst = stats.worst(1);
        let id = worst.first().map_or("?", |w| w.id.as_str());
        failures.push(format!(
            "min cosine {min:.6} < {} (sequence {id})",
            t.min_cosine
        ));
    }
    let mean = stats.mean_cosine();
    if n > 0 && !at_least(mean, t.mean_cosine) {
        failures.push(format!("mean cosine {mean:.6} < {}", t.mean_cosine));
    }
    if let (Some(limit), Some(d)) = (t.max_abs_token_diff, stats.max_abs_token_diff)
        && !at_least(limit, d)
    {
        failures.push(format!("max per-token abs diff {d:.6} > {limit}"));
    }
    failures
}

/// What was compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    pub path: String,
    pub ep: String,
    pub precision: String,
    pub attention: String,
    pub model: String,
    /// `engine` (folder with a manifest) or `model` (an export).
    pub kind: String,
}

/// The gate's verdict and figures (the JSON report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub pass: bool,
    pub failures: Vec<String>,
    pub candidate: Side,
    pub reference: Side,
    pub input: Vec<String>,
    pub sequences: usize,
    pub tokens: usize,
    pub min_cosine: f64,
    pub mean_cosine: f64,
    pub max_abs_mean_diff: f64,
    pub max_abs_token_diff: Option<f64>,
    pub worst: Vec<SequenceResult>,
    pub thresholds: Thresholds,
    /// Manifest mismatches let through by `--force`.
    pub forced: Vec<String>,
}

impl GateReport {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let side = |s: &Side| {
            format!(
                "{} [{} {}, {} {}, {} attention]",
                s.path, s.kind, s.model, s.ep, s.precision, s.attention
            )
        };
        let mut t = String::new();
        t.push_str(&format!("candidate: {}\n", side(&self.candidate)));
        t.push_str(&format!("reference: {}\n", side(&self.reference)));
        t.push_str(&format!(
            "compared {} sequences ({} tokens) from {}\n",
            self.sequences,
            self.tokens,
            self.input.join(", ")
        ));
        t.push_str(&format!(
            "cosine of mean embeddings: min {:.7} (threshold {}), mean {:.7} (threshold {})\n",
            self.min_cosine,
            self.thresholds.min_cosine,
            self.mean_cosine,
            self.thresholds.mean_cosine
        ));
        t.push_str(&format!(
            "max abs diff: mean embeddings {:.3e}, per-token states {}\n",
            self.max_abs_mean_diff,
            self.max_abs_token_diff
                .map_or_else(|| "not compared".into(), |d| format!("{d:.3e}"))
        ));
        for w in &self.worst {
            t.push_str(&format!(
                "  lowest: {} cosine {:.7} max abs diff {:.3e}\n",
                w.id, w.cosine, w.max_abs_diff
            ));
        }
        for f in &self.forced {
            t.push_str(&format!("forced past: {f}\n"));
        }
        if self.pass {
            t.push_str("GATE PASSED\n");
        } else {
            t.push_str(&format!("GATE FAILED: {}\n", self.failures.join("; ")));
        }
        t
    }
}

/// Everything [`run_gate`] needs.
#[derive(Debug, Clone)]
pub struct GateOptions {
    /// Engine folder (with `manifest.json`) or a model export.
    pub candidate: PathBuf,
    /// Engine folder or model export.
    pub reference: PathBuf,
    pub inputs: Vec<PathBuf>,
    /// Sequences to compare (the first ones of the input, in pack order).
    pub sample: usize,
    pub mode: Mode,
    pub chunk_len: usize,
    pub thresholds: Thresholds,
    pub ort_lib: Option<PathBuf>,
    /// Provider for a side that is a model export (engine folders use their manifest's); default:
    /// the candidate engine's, else CPU.
    pub ep: Option<Ep>,
    pub device_id: Option<i32>,
    /// Tokens per pack (default: the candidate engine's tuned budget, else 4096).
    pub token_budget: Option<usize>,
    /// Run engines whose manifest does not match this host.
    pub force: bool,
    /// Compare per-token states when both graphs have them.
    pub per_token: bool,
}

impl GateOptions {
    pub fn new(
        candidate: impl Into<PathBuf>,
        reference: impl Into<PathBuf>,
        input: PathBuf,
    ) -> Self {
        Self {
            candidate: candidate.into(),
            reference: reference.into(),
            inputs: vec![input],
            sample: 200,
            mode: Mode::Protein,
            chunk_len: 500,
            thresholds: Thresholds::default(),
            ort_lib: None,
            ep: None,
            device_id: None,
            token_budget: None,
            force: false,
            per_token: true,
        }
    }
}

struct Opened {
    options: EngineOptions,
    budget: Option<usize>,
    kind: &'static str,
    forced: Option<String>,
}

fn open_side(path: &Path, options: &GateOptions, ep: Option<Ep>) -> Result<Opened> {
    if path.is_dir() && path.join(MANIFEST_FILE).is_file() {
        let checked = check_engine_dir(
            path,
            options.ort_lib.as_deref(),
            options.device_id,
            options.force,
        )?;
        return Ok(Opened {
            budget: Some(checked.budget),
            options: checked.options,
            kind: "engine",
            forced: checked.forced_mismatch,
        });
    }
    let mut o = EngineOptions::new(path, ep.unwrap_or(Ep::Cpu));
    o.ort_lib = options.ort_lib.clone();
    o.device_id = options.device_id.unwrap_or(0);
    Ok(Opened {
        options: o,
        budget: None,
        kind: "model",
        forced: None,
    })
}

fn has_hidden(model: &Path) -> Result<bool> {
    let meta = ModelFiles::locate(model)?.load_metadata(true)?;
    Ok(meta.outputs.iter().any(|o| o.name == "hidden"))
}

/// The first `k` sequences of a pack, as a pack.
pub fn truncate_pack(batch: &PackedBatch, k: usize) -> PackedBatch {
    let mut out = PackedBatch::default();
    for i in 0..k.min(batch.num_sequences()) {
        let tokens: Vec<u8> = batch.input_ids[batch.token_range(i)]
            .iter()
            .map(|&t| t as u8)
            .collect();
        let meta: SequenceMeta = batch.sequences[i].clone();
        out.push(meta, &tokens);
    }
    out
}

/// Embeds the sample with both sides and returns the report (pass or fail). Errors are for what
/// prevents the comparison: a missing engine, a refused manifest, unreadable input.
pub fn run_gate(options: &GateOptions) -> Result<GateReport> {
    let candidate = open_side(&options.candidate, options, options.ep)?;
    let ep = options.ep.or(Some(candidate.options.ep));
    let reference = open_side(&options.reference, options, ep)?;
    let per_token = options.per_token
        && has_hidden(&candidate.options.model)?
        && has_hidden(&reference.options.model)?;
    let mut c_opts = candidate.options.clone();
    let mut r_opts = reference.options.clone();
    c_opts.per_token = per_token;
    r_opts.per_token = per_token;
    let mut c_engine = open_engine(&c_opts)?;
    let mut r_engine = open_engine(&r_opts)?;
    let (ci, ri) = (c_engine.info().clone(), r_engine.info().clone());
    if ci.hidden_size != ri.hidden_size {
        return Err(GateError::Mismatch(format!(
            "candidate {} has hidden size {}, reference {} has {}: not the same model",
            options.candidate.display(),
            ci.hidden_size,
            options.reference.display(),
            ri.hidden_size
        )));
    }
    // Both sides must be the same model family, and the sequences go through that family's
    // tokenizer (a DNABERT-S export brings its tokenizer.json): the ESM-2 alphabet fed to a DNA
    // model would compare two wrong embeddings and could still pass.
    if ci.metadata.family != ri.metadata.family {
        return Err(GateError::Mismatch(format!(
            "candidate {} is a {} model, reference {} a {} model",
            options.candidate.display(),
            ci.metadata.family,
            options.reference.display(),
            ri.metadata.family
        )));
    }
    if options.mode == Mode::Protein && !ci.metadata.family.traits().reads_proteins {
        return Err(GateError::Mismatch(format!(
            "{} models take DNA: compare them on nucleotide input (--mode nucleotide)",
            ci.metadata.family
        )));
    }
    let encoder = family_encoder(&ci)?;
    let budget = options
        .token_budget
        .or(candidate.budget)
        .unwrap_or(4096)
        .max(1026);
    let config = PipelineConfig {
        inputs: options.inputs.clone(),
        mode: options.mode,
        chunk_len: options.chunk_len,
        token_budget: budget,
        encoders: vec![encoder],
        ..Default::default()
    };
    let mut stats = Stats::default();
    let h = ci.hidden_size;
    let mut done = 0usize;
    let pipeline = virnuc_data::start(config)?;
    for pack in pipeline {
        if done >= options.sample {
            break;
        }
        let pack = pack?;
        let pack = if done + pack.num_sequences() > options.sample {
            truncate_pack(&pack, options.sample - done)
        } else {
            pack
        };
        let r = r_engine.embed(&pack)?;
        let c = c_engine.embed(&pack)?;
        let ids: Vec<String> = pack.sequences.iter().map(|s| s.id.clone()).collect();
        stats.add_pack(&ids, &r.mean, &c.mean, h);
        if let (Some(rh), Some(ch)) = (&r.hidden, &c.hidden) {
            stats.add_tokens(rh, ch);
        }
        stats.tokens += pack.num_tokens();
        done += pack.num_sequences();
    }
    let failures = evaluate(&stats, &options.thresholds);
    let side = |path: &Path, info: &virnuc_engine::EngineInfo, kind: &str| Side {
        path: path.display().to_string(),
        ep: info.ep.to_string(),
        precision: info.metadata.precision.clone(),
        attention: info.metadata.attention.clone(),
        model: info.metadata.model.name.clone(),
        kind: kind.to_string(),
    };
    Ok(GateReport {
        pass: failures.is_empty(),
        failures,
        candidate: side(&options.candidate, &ci, candidate.kind),
        reference: side(&options.reference, &ri, reference.kind),
        input: options
            .inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        sequences: stats.sequences.len(),
        tokens: stats.tokens,
        min_cosine: stats.min_cosine(),
        mean_cosine: stats.mean_cosine(),
        max_abs_mean_diff: stats.max_abs_mean_diff(),
        max_abs_token_diff: stats.max_abs_token_diff,
        worst: stats.worst(5),
        thresholds: options.thresholds.clone(),
        forced: [candidate.forced, reference.forced]
            .into_iter()
            .flatten()
            .collect(),
    })
}

/// The tokenizer of an engine's model family: the ESM-2 alphabet, or the export's `tokenizer.json`
/// (its sha256 was checked against `model.json` when the engine opened).
fn family_encoder(
    info: &virnuc_engine::EngineInfo,
) -> Result<std::sync::Arc<virnuc_data::Encoder>> {
    let files = ModelFiles::locate(&info.model_path)?;
    let tokenizer = files.tokenizer_file(&info.metadata);
    let encoder = virnuc_data::Encoder::for_model(&info.metadata, tokenizer.as_deref())?;
    Ok(std::sync::Arc::new(encoder))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn thresholds_parse_with_defaults_and_reject_typos() {
        let t = Thresholds::from_yaml_str("min_cosine: 0.995\n").expect("valid");
        assert_eq!(t.min_cosine, 0.995);
        assert_eq!(t.mean_cosine, 0.999);
        let t = Thresholds::from_yaml_str("max_abs_token_diff: 0.05\nmin_sequences: 10\n")
            .expect("valid");
        assert_eq!(t.max_abs_token_diff, Some(0.05));
        assert!(Thresholds::from_yaml_str("min_cosin: 0.5\n").is_err());
        assert!(Thresholds::from_yaml_str("min_cosine: 2\n").is_err());
        assert!(Thresholds::from_yaml_str("max_abs_token_diff: -1\n").is_err());
    }

    #[test]
    fn each_threshold_can_fail_the_gate() {
        let mut s = Stats::default();
        s.add_pack(&["x".into()], &[1.0, 0.0], &[1.0, 0.2], 2);
        let cos = s.min_cosine();
        // 0.2f32 is not 0.2: the tolerance covers its rounding.
        assert!((cos - 1.0 / 1.04f64.sqrt()).abs() < 1e-8, "{cos}");
        let loose = Thresholds {
            min_cosine: 0.9,
            mean_cosine: 0.9,
            ..Thresholds::default()
        };
        assert!(evaluate(&s, &loose).is_empty());
        let f = evaluate(&s, &Thresholds::default());
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].contains("sequence x"), "{f:?}");
        let mut t = loose.clone();
        t.min_sequences = 2;
        assert_eq!(evaluate(&s, &t).len(), 1);
        s.add_tokens(&[1.0, 2.0], &[1.0, 2.5]);
        let mut t = loose;
        t.max_abs_token_diff = Some(0.4);
        assert_eq!(evaluate(&s, &t).len(), 1);
        t.max_abs_token_diff = Some(0.5);
        assert!(evaluate(&s, &t).is_empty());
    }

    #[test]
    fn nan_and_zero_vectors_fail() {
        let mut s = Stats::default();
        s.add_pack(&["z".into()], &[0.0, 0.0], &[0.0, 0.0], 2);
        assert!(s.min_cosine().is_nan());
        assert!(!evaluate(&s, &Thresholds::default()).is_empty());
        let mut s = Stats::default();
        s.add_pack(&["n".into()], &[1.0, f32::NAN], &[1.0, 1.0], 2);
        assert!(!evaluate(&s, &Thresholds::default()).is_empty());
        s.add_tokens(&[f32::NAN], &[1.0]);
        assert!(s.max_abs_token_diff.is_some_and(f64::is_nan));
        assert!(evaluate(&Stats::default(), &Thresholds::default())[0].contains("0 sequences"));
    }

    #[test]
    fn truncation_keeps_the_first_sequences_exactly() {
        let mut b = PackedBatch::default();
        for (i, len) in [4usize, 6, 5].into_iter().enumerate() {
            let mut toks = vec![5u8; len];
            toks[0] = 0;
            toks[len - 1] = 2;
            b.push(
                SequenceMeta {
                    index: i as u64,
                    record: 0,
                    id: format!("s{i}"),
                    residues: (len - 2) as u32,
                },
                &toks,
            );
        }
        let t = truncate_pack(&b, 2);
        assert_eq!(t.num_sequences(), 2);
        assert_eq!(t.input_ids[..], b.input_ids[..10]);
        assert_eq!(t.cu_seqlens, vec![0, 4, 10]);
        assert_eq!(truncate_pack(&b, 9), b);
    }

    proptest! {
        /// Cosine agrees with a direct f64 formula, is symmetric, scale-invariant and ≤ 1.
        #[test]
        fn cosine_properties(v in proptest::collection::vec((-10.0f32..10.0, -10.0f32..10.0), 1..64), k in 0.1f32..10.0) {
            let a: Vec<f32> = v.iter().map(|p| p.0).collect();
            let b: Vec<f32> = v.iter().map(|p| p.1).collect();
            let c = cosine(&a, &b);
            prop_assume!(!c.is_nan());
            prop_assert!((-1.0 - 1e-12..=1.0 + 1e-12).contains(&c));
            prop_assert!((c - cosine(&b, &a)).abs() < 1e-12);
            let scaled: Vec<f32> = a.iter().map(|x| x * k).collect();
            prop_assert!((c - cosine(&scaled, &b)).abs() < 1e-5);
            prop_assert!((cosine(&a, &a) - 1.0).abs() < 1e-12);
        }
    }
}
