//! VirNucPro's `MLPClassifier` in fp32, read from the exporter's `classifier.safetensors` +
//! `classifier.json` (`python -m virnuc_export --classifier FILE.pth --out DIR`).
//!
//! `probs = softmax(W2 · relu(BN(W1 · x + b1)) + b2)` with BatchNorm in eval mode
//! (`(h − running_mean) / sqrt(running_var + eps) · weight + bias`, folded into one scale and shift as
//! PyTorch's CPU kernel does) and Dropout a no-op. `x = [DNABERT-S mean (768) | ESM-2 mean (H_esm)]`.
//! Frames are classified a batch at a time with one matrix product (matrixmultiply's sgemm); each
//! row's result does not depend on the other rows of the batch (tested), so resumed runs give the
//! same bits as uninterrupted ones.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::PredictError;

/// `format` of `classifier.json`.
pub const FORMAT: &str = "virnuc-trt-classifier/1";
/// DNABERT-S hidden size: the first part of every feature vector.
pub const DNABERT_DIM: usize = 768;
/// Class labels in output order, as VirNucPro's `label_map`.
pub const LABELS: [&str; 2] = ["others", "virus"];

/// `classifier.json`, the fields the runtime reads (the rest is provenance).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClassifierMetadata {
    pub format: String,
    pub input_dim: usize,
    pub dnabert_dim: usize,
    pub esm_dim: usize,
    pub hidden_dim: usize,
    pub num_classes: usize,
    pub labels: Vec<String>,
    pub feature_order: Vec<String>,
    pub batch_norm_eps: f64,
    pub source: ClassifierSource,
    pub random_weights: bool,
    pub safetensors_sha256: String,
}

/// Where the classifier's weights came from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct ClassifierSource {
    pub kind: String,
    pub path: Option<String>,
    pub sha256: Option<String>,
    pub seed: Option<u64>,
}

/// The loaded classifier.
#[derive(Debug, Clone)]
pub struct Classifier {
    pub metadata: ClassifierMetadata,
    /// The `classifier.json` it was read from.
    pub path: PathBuf,
    /// `hidden_layer.weight` `[hidden, input]`, row-major.
    w1: Vec<f32>,
    b1: Vec<f32>,
    /// BatchNorm folded: `h · scale + shift`.
    bn_scale: Vec<f32>,
    bn_shift: Vec<f32>,
    /// `output_layer.weight` `[2, hidden]`.
    w2: Vec<f32>,
    b2: [f32; 2],
}

impl Classifier {
    /// From the exporter's folder, its `classifier.json`, or its `classifier.safetensors`.
    pub fn open(path: &Path) -> Result<Self, PredictError> {
        let json = if path.is_dir() {
            path.join("classifier.json")
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            path.with_extension("json")
        } else {
            path.to_path_buf()
        };
        let bad = |message: String| PredictError::Classifier {
            path: json.clone(),
            message,
        };
        let text = std::fs::read_to_string(&json).map_err(|e| {
            bad(format!(
                "cannot read it ({e}); give the folder `python -m virnuc_export --classifier \
                 FILE.pth --out DIR` wrote"
            ))
        })?;
        let metadata: ClassifierMetadata =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a classifier.json: {e}")))?;
        if metadata.format != FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {FORMAT:?}",
                metadata.format
            )));
        }
        let m = &metadata;
        if m.num_classes != 2 || m.labels != LABELS {
            return Err(bad(format!(
                "{} classes {:?}; VirNucPro's classifier has 2, {LABELS:?}",
                m.num_classes, m.labels
            )));
        }
        if m.dnabert_dim != DNABERT_DIM
            || m.esm_dim == 0
            || m.input_dim != m.dnabert_dim + m.esm_dim
            || m.hidden_dim == 0
        {
            return Err(bad(format!(
                "inconsistent dimensions: input {} = DNABERT-S {} + ESM-2 {}, hidden {}",
                m.input_dim, m.dnabert_dim, m.esm_dim, m.hidden_dim
            )));
        }
        if m.feature_order != ["dnabert_s_mean", "esm2_mean"] {
            return Err(bad(format!(
                "feature order {:?}; VirNucPro's is [dnabert_s_mean, esm2_mean]",
                m.feature_order
            )));
        }
        if !(m.batch_norm_eps > 0.0 && m.batch_norm_eps < 1.0) {
            return Err(bad(format!(
                "batch_norm_eps {} outside (0, 1)",
                m.batch_norm_eps
            )));
        }
        let st_path = json.with_file_name("classifier.safetensors");
        let bytes = std::fs::read(&st_path).map_err(|e| PredictError::Classifier {
            path: st_path.clone(),
            message: format!("cannot read it: {e}"),
        })?;
        let st_bad = |message: String| PredictError::Classifier {
            path: st_path.clone(),
            message,
        };
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| st_bad(format!("not a safetensors file: {e}")))?;
        let (h, i) = (m.hidden_dim, m.input_dim);
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, PredictError> {
            let t = tensors
                .tensor(name)
                .map_err(|e| st_bad(format!("{name}: {e}")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                return Err(st_bad(format!(
                    "{name} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(st_bad(format!("{name} holds non-finite values")));
            }
            Ok(v)
        };
        let w1 = get("hidden_layer.weight", &[h, i])?;
        let b1 = get("hidden_layer.bias", &[h])?;
        let gamma = get("bn1.weight", &[h])?;
        let beta = get("bn1.bias", &[h])?;
        let mean = get("bn1.running_mean", &[h])?;
        let var = get("bn1.running_var", &[h])?;
        let w2 = get("output_layer.weight", &[2, h])?;
        let b2 = get("output_layer.bias", &[2])?;
        if var.iter().any(|&v| v < 0.0) {
            return Err(st_bad("bn1.running_var has negative entries".into()));
        }
        let eps = m.batch_norm_eps as f32;
        let bn_scale: Vec<f32> = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| g / (v + eps).sqrt())
            .collect();
        let bn_shift = beta
            .iter()
            .zip(&mean)
            .zip(&bn_scale)
            .map(|((b, mu), s)| b - mu * s)
            .collect();
        Ok(Self {
            path: json,
            w1,
            b1,
            bn_scale,
            bn_shift,
            w2,
            b2: [b2[0], b2[1]],
            metadata,
        })
    }

    pub fn input_dim(&self) -> usize {
        self.metadata.input_dim
    }

    pub fn esm_dim(&self) -> usize {
        self.metadata.esm_dim
    }

    pub fn hidden_dim(&self) -> usize {
        self.metadata.hidden_dim
    }

    /// Checks the two models' widths against the classifier's inputs (before any work is done).
    pub fn check_models(&self, dnabert_hidden: usize, esm_hidden: usize) -> Result<(), String> {
        let m = &self.metadata;
        if dnabert_hidden != m.dnabert_dim || esm_hidden != m.esm_dim {
            return Err(format!(
                "the classifier {} takes {} = {} (DNABERT-S) + {} (ESM-2) features, but the models \
                 give {dnabert_hidden} (DNABERT-S) + {esm_hidden} (ESM-2)",
                self.path.display(),
                m.input_dim,
                m.dnabert_dim,
                m.esm_dim
            ));
        }
        Ok(())
    }

    /// Probabilities `[P(others), P(virus)]` of `n` frames whose features are the rows of
    /// `features` (`[n, input_dim]`, row-major).
    pub fn classify(&self, features: &[f32]) -> Vec<[f32; 2]> {
        let (i, h) = (self.input_dim(), self.hidden_dim());
        assert_eq!(
            features.len() % i,
            0,
            "features must be rows of the input width"
        );
        let n = features.len() / i;
        if n == 0 {
            return Vec::new();
        }
        let mut hidden = vec![0f32; n * h];
        // hidden[n, h] = features[n, i] · W1ᵀ  (W1 is [h, i]: its transpose has strides (1, i)).
        // SAFETY: the pointers cover n·i, h·i and n·h elements with the strides given.
        unsafe {
            matrixmultiply::sgemm(
                n,
                i,
                h,
                1.0,
                features.as_ptr(),
                i as isize,
                1,
                self.w1.as_ptr(),
                1,
                i as isize,
                0.0,
                hidden.as_mut_ptr(),
                h as isize,
                1,
            );
        }
        hidden
            .chunks_exact(h)
            .map(|row| {
                let mut logits = self.b2;
                for (j, &x) in row.iter().enumerate() {
                    let y = ((x + self.b1[j]) * self.bn_scale[j] + self.bn_shift[j]).max(0.0);
                    logits[0] += y * self.w2[j];
                    logits[1] += y * self.w2[h + j];
                }
                softmax2(logits)
            })
            .collect()
    }
}

/// Softmax of two logits, as `torch.softmax`: `exp(x − max) / Σ exp(x − max)`.
pub fn softmax2(logits: [f32; 2]) -> [f32; 2] {
    let m = logits[0].max(logits[1]);
    let e = [(logits[0] - m).exp(), (logits[1] - m).exp()];
    let s = e[0] + e[1];
    [e[0] / s, e[1] / s]
}

/// VirNucPro's label: `torch.max` over the probabilities, the first index on a tie (`others`).
pub fn label(p: [f32; 2]) -> &'static str {
    if p[1] > p[0] { LABELS[1] } else { LABELS[0] }
}
