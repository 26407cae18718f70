//! VirNucPro's prediction step for `virnuc-trt predict`: its MLP classifier in fp32 and its output
//! files, as pure functions.
//!
//! * [`classifier`]: `classifier.safetensors` + `classifier.json` from the exporter
//!   (`python -m virnuc_export --classifier 500_model.pth --out DIR`), batched fp32 inference;
//! * [`numpy_str`]: numpy's `str()` of a float32, the form of VirNucPro's scores;
//! * [`results`]: `prediction_results.txt`, `prediction_results_highestscore.csv` (pandas' grouping
//!   and sort) and the per-record verdicts VirNucPro lacks.
//!
//! ```
//! use virnuc_predict::results::{HighestScore, results_line};
//! let mut txt = String::new();
//! let mut best = HighestScore::default();
//! for (id, p) in [("ctg_chunk_1F1", [0.25f32, 0.75]), ("ctg_chunk_1R2", [0.9, 0.1])] {
//!     results_line(&mut txt, id, p);
//!     best.add(id, p);
//! }
//! assert_eq!(txt, "ctg_chunk_1F1\tvirus\t0.25\t0.75\nctg_chunk_1R2\tothers\t0.9\t0.1\n");
//! assert_eq!(best.rows().collect::<Vec<_>>(), [("ctg_chunk_1", false)]);
//! ```

use std::path::PathBuf;

pub mod classifier;
pub mod numpy_str;
pub mod results;

pub use classifier::Classifier;

/// Errors of the prediction step; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("classifier {path}: {message}")]
    Classifier { path: PathBuf, message: String },
}
