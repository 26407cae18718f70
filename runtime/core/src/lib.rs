//! The small core every virnuc-trt crate shares: the ESM-2 alphabet, the packed batch handed from the
//! data path to an engine, the model configuration (`models/*.yaml`) and the metadata the exporter
//! writes next to each ONNX graph.
//!
//! ```
//! use virnuc_core::{PackedBatch, SequenceMeta, alphabet};
//! let mut batch = PackedBatch::default();
//! batch.push(SequenceMeta { index: 0, record: 0, id: "seq1".into(), residues: 2 }, &[alphabet::CLS, 5, 6, alphabet::EOS]);
//! assert_eq!(batch.cu_seqlens, vec![0, 4]);
//! assert_eq!(batch.position_ids, vec![0, 1, 2, 3]);
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod alphabet;

/// Errors reading the shared configuration files.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid model config: {message}")]
    Config { path: String, message: String },
    #[error("{path} is not valid model metadata: {source}")]
    Metadata {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One sequence of a pack: where its embedding goes in the output and what it is called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceMeta {
    /// Position of this sequence in the output (input order after chunking/translation), from 0.
    pub index: u64,
    /// 0-based position of the input record this sequence comes from (all input files in order,
    /// empty records and other shards' records counted): the same in every `--input-shard` run, so
    /// `merge` restores the input order from it. A record's sequences are consecutive.
    #[serde(default)]
    pub record: u64,
    /// Output id, e.g. `contig7_chunk_2F1` in nucleotide mode or the FASTA id in protein mode.
    pub id: String,
    /// Residues, `<cls>`/`<eos>` excluded.
    pub residues: u32,
}

/// Sequences concatenated without padding: the engine input.
///
/// Invariants (kept by [`PackedBatch::push`]): `cu_seqlens[0] == 0`, `cu_seqlens` is increasing,
/// `cu_seqlens.last() == input_ids.len()`, `position_ids` restart at 0 at each sequence start, and
/// `sequences[i]` describes tokens `cu_seqlens[i]..cu_seqlens[i + 1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    pub input_ids: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub cu_seqlens: Vec<i32>,
    pub max_seqlen: usize,
    pub sequences: Vec<SequenceMeta>,
}

impl Default for PackedBatch {
    fn default() -> Self {
        Self {
            input_ids: Vec::new(),
            position_ids: Vec::new(),
            cu_seqlens: vec![0],
            max_seqlen: 0,
            sequences: Vec::new(),
        }
    }
}

impl PackedBatch {
    /// Appends one tokenized sequence (`<cls>` … `<eos>` included).
    pub fn push(&mut self, meta: SequenceMeta, tokens: &[u8]) {
        self.input_ids.extend(tokens.iter().map(|&t| i64::from(t)));
        self.position_ids.extend(0..tokens.len() as i64);
        self.cu_seqlens.push(self.input_ids.len() as i32);
        self.max_seqlen = self.max_seqlen.max(tokens.len());
        self.sequences.push(meta);
    }

    /// Total tokens, special tokens included.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn num_sequences(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Token range of sequence `i` in the pack.
    pub fn token_range(&self, i: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[i] as usize..self.cu_seqlens[i + 1] as usize
    }
}

/// A model family: it decides the graph, the tokenizer and the pooling rule (`family` in
/// `models/*.yaml` and `model.json`; absent means ESM-2, as in files written before DNABERT-S).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// ESM-2 protein language models (fair-esm / HF `EsmModel`).
    #[default]
    Esm2,
    /// DNABERT-S / DNABERT-2 (MosaicBERT: ALiBi, post-LN, GeGLU, BPE tokenizer).
    DnabertS,
}

/// How the graph's `mean` output pools the token states of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over residues: tokens 1 .. len-2 (`<cls>`/`<eos>` left out), ESM-2's rule.
    #[default]
    MeanResidues,
    /// Mean over every token, `[CLS]`/`[SEP]` included (VirNucPro's rule for DNABERT-S).
    MeanAllTokens,
}

/// The tokenizer a model was exported with (`tokenizer` in `model.json`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// The fixed ESM-2 alphabet (`alphabet` in `model.json`).
    #[default]
    Esm2Alphabet,
    /// A Hugging Face `tokenizers` file beside the graph (path relative to the export folder) with
    /// its sha256.
    HfTokenizers { file: String, sha256: String },
}

/// An ESM-2 architecture, as in `models/*.yaml` (shared with the Python exporter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    #[serde(default)]
    pub family: ModelFamily,
    pub checkpoint: String,
    pub hf_repo: String,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub num_heads: u32,
    pub ffn_size: u32,
    pub vocab_size: u32,
    pub max_positions: u32,
    pub max_residues: u32,
    pub layer_norm_eps: f64,
    pub rotary_base: f64,
    pub token_dropout_scale: f64,
}

impl ModelConfig {
    pub fn from_yaml_file(path: &Path) -> Result<Self, CoreError> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml_str(&text).map_err(|message| CoreError::Config {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_yaml_str(text: &str) -> Result<Self, String> {
        let config: Self = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        if config.num_heads == 0 || !config.hidden_size.is_multiple_of(config.num_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_heads {}",
                config.hidden_size, config.num_heads
            ));
        }
        Ok(config)
    }

    pub fn head_dim(&self) -> u32 {
        self.hidden_size / self.num_heads
    }

    /// Forward FLOPs per token, matrix products only (2 · parameters touched per token).
    pub fn flops_per_token(&self) -> f64 {
        let h = f64::from(self.hidden_size);
        let f = f64::from(self.ffn_size);
        f64::from(self.num_layers) * 2.0 * (4.0 * h * h + 2.0 * h * f)
    }
}

/// The JSON file the exporter writes next to `model.onnx` (`model.json`); see `export/README.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// `virnuc-trt-onnx/1`.
    pub format: String,
    /// Also in `model.family`; absent in exports written before DNABERT-S (then ESM-2).
    #[serde(default)]
    pub family: ModelFamily,
    pub model: ModelConfig,
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    /// The ESM-2 alphabet (id = index); empty for other families.
    pub alphabet: Vec<String>,
    #[serde(default)]
    pub pooling: Pooling,
    /// `virnuc`, `ort` or `masked`.
    pub attention: String,
    /// ONNX Runtime fused operators (`SkipLayerNormalization`, `BiasGelu`) in the graph.
    pub fused: bool,
    /// `fp32` or `fp16`.
    pub precision: String,
    /// Layer whose states are pooled, as fair-esm `repr_layers` (0 = embeddings).
    pub repr_layer: u32,
    /// Graph inputs, in order.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs, in order.
    pub outputs: Vec<TensorSpec>,
    pub source: ModelSource,
    pub random_weights: bool,
    pub exporter_version: String,
    /// sha256 of the `.onnx` file (external data not included).
    pub onnx_sha256: String,
}

/// Key of the ONNX model's `metadata_props` entry in which the exporter stores this metadata (every
/// field but `onnx_sha256`, as JSON).
pub const ONNX_METADATA_KEY: &str = "virnuc.metadata";

impl ModelMetadata {
    pub fn from_json_file(path: &Path) -> Result<Self, CoreError> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| CoreError::Metadata {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Name, element type (`int64`, `int32`, `float32`, `float16`) and symbolic shape of a graph tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<String>,
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSource {
    /// `random`, `hf` or `fair-esm`.
    pub kind: String,
    pub path: Option<String>,
    pub sha256: Option<String>,
    pub seed: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_yaml_parses_and_matches_its_name() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("models/ exists") {
            let path = entry.expect("readable").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let config = ModelConfig::from_yaml_file(&path).expect("valid config");
                assert_eq!(
                    path.file_stem().and_then(|s| s.to_str()),
                    Some(config.name.as_str())
                );
                assert_eq!(config.ffn_size, 4 * config.hidden_size);
                seen += 1;
            }
        }
        assert_eq!(seen, 6);
    }

    #[test]
    fn flops_per_token_of_3b_is_about_5_7_gflop() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/esm2_t36_3B.yaml");
        let config = ModelConfig::from_yaml_file(&path).expect("valid config");
        let gflop = config.flops_per_token() / 1e9;
        assert!((5.5..5.9).contains(&gflop), "{gflop}");
        assert_eq!(config.head_dim(), 64);
    }

    #[test]
    fn metadata_family_tokenizer_and_pooling_parse_and_default_to_esm2() {
        let json = |extra: &str| {
            format!(
                r#"{{"format": "virnuc-trt-onnx/1", {extra} "model": {{"name": "m", "checkpoint": "",
                "hf_repo": "", "num_layers": 1, "hidden_size": 8, "num_heads": 2, "ffn_size": 32,
                "vocab_size": 33, "max_positions": 1026, "max_residues": 1022, "layer_norm_eps": 1e-5,
                "rotary_base": 10000.0, "token_dropout_scale": 0.88}}, "alphabet": [],
                "attention": "masked", "fused": false, "precision": "fp32", "repr_layer": 1,
                "inputs": [], "outputs": [], "source": {{"kind": "random", "path": null,
                "sha256": null, "seed": 0}}, "random_weights": true, "exporter_version": "0",
                "onnx_sha256": ""}}"#
            )
        };
        // Written before the families existed: ESM-2 defaults.
        let old: ModelMetadata = serde_json::from_str(&json("")).expect("old metadata");
        assert_eq!(old.family, ModelFamily::Esm2);
        assert_eq!(old.model.family, ModelFamily::Esm2);
        assert_eq!(old.tokenizer, TokenizerSpec::Esm2Alphabet);
        assert_eq!(old.pooling, Pooling::MeanResidues);
        let new: ModelMetadata = serde_json::from_str(&json(
            r#""family": "dnabert_s", "pooling": "mean_all_tokens",
            "tokenizer": {"kind": "hf_tokenizers", "file": "tokenizer.json", "sha256": "ab"},"#,
        ))
        .expect("new metadata");
        assert_eq!(new.family, ModelFamily::DnabertS);
        assert_eq!(new.pooling, Pooling::MeanAllTokens);
        assert_eq!(
            new.tokenizer,
            TokenizerSpec::HfTokenizers {
                file: "tokenizer.json".into(),
                sha256: "ab".into()
            }
        );
        assert!(serde_json::from_str::<ModelMetadata>(&json(r#""family": "bert","#)).is_err());
    }

    #[test]
    fn config_rejects_unknown_fields_and_bad_heads() {
        let good = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/esm2_t6_8M.yaml"),
        )
        .expect("readable");
        assert!(ModelConfig::from_yaml_str(&format!("{good}\nextra: 1\n")).is_err());
        assert!(
            ModelConfig::from_yaml_str(&good.replace("num_heads: 20", "num_heads: 7")).is_err()
        );
    }
}
