//! The small core every virnuc-trt crate shares: the model families ([`family`]), the ESM-2 alphabet,
//! the packed batch handed from the data path to an engine, the model configuration (`models/*.yaml`)
//! and the metadata the exporter writes next to each ONNX graph.
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
pub mod family;

pub use family::{FrameInput, ModelFamily, Pooling, TokenizerKind, TokenizerSpec};

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
    /// Tokens between the two special tokens: residues for ESM-2 (`<cls>`/`<eos>` excluded), BPE
    /// tokens for DNABERT-S (`[CLS]`/`[SEP]` excluded).
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
    /// Appends one tokenized sequence, special tokens included (`<cls>` … `<eos>`, `[CLS]` … `[SEP]`).
    /// Takes ids of any width (`u8` ESM-2 tokens, `u32` BPE ids).
    pub fn push<T: Copy + Into<i64>>(&mut self, meta: SequenceMeta, tokens: &[T]) {
        self.input_ids.extend(tokens.iter().map(|&t| t.into()));
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

/// Digest of one sequence as it goes to the model: its output id and token ids (FNV-1a, 64-bit;
/// stable across builds and platforms). A resumed run compares these with the ones the interrupted
/// run stored, so it continues only over the input it had read.
pub fn sequence_digest(id: &str, tokens: impl IntoIterator<Item = u32>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    };
    for &b in id.as_bytes() {
        eat(b);
    }
    // A separator no id byte sequence can imitate with tokens (ids are whole UTF-8, 0xff is not).
    eat(0xff);
    for t in tokens {
        for b in t.to_le_bytes() {
            eat(b);
        }
    }
    h
}

/// A model architecture, as in `models/*.yaml` (shared with the Python exporter). The ESM-2-only
/// fields are present exactly for the ESM-2 family ([`ModelConfig::from_yaml_str`] checks it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// Absent in older configs: ESM-2.
    #[serde(default)]
    pub family: ModelFamily,
    pub checkpoint: String,
    pub hf_repo: String,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub num_heads: u32,
    pub ffn_size: u32,
    pub vocab_size: u32,
    pub layer_norm_eps: f64,
    /// ESM-2: learned-position legacy size (1022 residues + 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_positions: Option<u32>,
    /// ESM-2: residues fair-esm keeps per sequence (1022).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_residues: Option<u32>,
    /// ESM-2: rotary embedding base (10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_base: Option<f64>,
    /// ESM-2: token-dropout rescale at inference (0.88).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_dropout_scale: Option<f64>,
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
        config.validate()?;
        Ok(config)
    }

    /// Sizes positive and consistent; the ESM-2-only fields present for ESM-2 and absent otherwise.
    pub fn validate(&self) -> Result<(), String> {
        for (what, v) in [
            ("num_layers", self.num_layers),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("ffn_size", self.ffn_size),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(format!("{what} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return Err(format!(
                "layer_norm_eps {} outside (0, 1)",
                self.layer_norm_eps
            ));
        }
        let esm_only = [
            ("max_positions", self.max_positions.is_some()),
            ("max_residues", self.max_residues.is_some()),
            ("rotary_base", self.rotary_base.is_some()),
            ("token_dropout_scale", self.token_dropout_scale.is_some()),
        ];
        let esm = self.family == ModelFamily::Esm2;
        for (field, present) in esm_only {
            if present != esm {
                return Err(if esm {
                    format!("{field} is required for the ESM-2 family")
                } else {
                    format!(
                        "{field} is an ESM-2 setting; the {} family has none",
                        self.family
                    )
                });
            }
        }
        if esm && self.vocab_size as usize != alphabet::TOKENS.len() {
            return Err(format!(
                "vocab_size {} != the ESM-2 alphabet's {}",
                self.vocab_size,
                alphabet::TOKENS.len()
            ));
        }
        if self.max_residues == Some(0) {
            return Err("max_residues must be positive".into());
        }
        Ok(())
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
    /// Absent in exports made before DNABERT-S: ESM-2 (also in `model.family`).
    #[serde(default)]
    pub family: ModelFamily,
    pub model: ModelConfig,
    /// The tokenizer the graph's ids come from; absent = the ESM-2 alphabet.
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    /// The ESM-2 alphabet (token strings by id); empty for a family with a tokenizer file.
    #[serde(default)]
    pub alphabet: Vec<String>,
    /// How the graph pools (`mean` output); absent = ESM-2's rule. Must be the family's rule.
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

    /// Checks that family, model config, pooling, tokenizer and alphabet agree, so that the runtime
    /// feeds the graph the ids and frames it was built for. Returns what is wrong.
    pub fn check_family(&self) -> Result<(), String> {
        let family = self.family;
        let traits = family.traits();
        if self.model.family != family {
            return Err(format!(
                "family `{}` but its model config says `{}`",
                family.as_str(),
                self.model.family.as_str()
            ));
        }
        self.model.validate()?;
        if self.pooling != traits.pooling {
            return Err(format!(
                "pooling {:?} is not the {family} rule ({:?})",
                self.pooling, traits.pooling
            ));
        }
        if self.tokenizer.kind() != traits.tokenizer {
            return Err(format!(
                "tokenizer {:?} is not the {family} tokenizer ({:?})",
                self.tokenizer.kind(),
                traits.tokenizer
            ));
        }
        match traits.tokenizer {
            TokenizerKind::Esm2Alphabet => {
                if self
                    .alphabet
                    .iter()
                    .map(String::as_str)
                    .ne(alphabet::TOKENS)
                {
                    return Err(
                        "the model's alphabet differs from ESM-2's (the tokenizer would feed it wrong ids)"
                            .into(),
                    );
                }
            }
            TokenizerKind::HfTokenizers => {
                if let TokenizerSpec::HfTokenizers { file, sha256 } = &self.tokenizer {
                    let plain = Path::new(file)
                        .file_name()
                        .is_some_and(|n| n == std::ffi::OsStr::new(file));
                    if !plain {
                        return Err(format!(
                            "tokenizer file {file:?} must be a file name inside the export folder"
                        ));
                    }
                    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("tokenizer sha256 {sha256:?} is not 64 hex digits"));
                    }
                }
            }
        }
        Ok(())
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
                if config.family == ModelFamily::Esm2 {
                    assert_eq!(config.ffn_size, 4 * config.hidden_size);
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 6, "six ESM-2 sizes");
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

    const DNABERT_YAML: &str = "name: dnabert_s\nfamily: dnabert_s\ncheckpoint: zhihan1996/DNABERT-S\n\
        hf_repo: zhihan1996/DNABERT-S\nnum_layers: 12\nhidden_size: 768\nnum_heads: 12\n\
        ffn_size: 3072\nvocab_size: 4096\nlayer_norm_eps: 1.0e-12\n";

    #[test]
    fn a_dnabert_config_has_no_esm_fields() {
        let c = ModelConfig::from_yaml_str(DNABERT_YAML).expect("valid");
        assert_eq!(c.family, ModelFamily::DnabertS);
        assert_eq!((c.max_residues, c.rotary_base), (None, None));
        let e = ModelConfig::from_yaml_str(&format!("{DNABERT_YAML}rotary_base: 10000.0\n"))
            .expect_err("ESM field");
        assert!(e.contains("rotary_base"), "{e}");
        // An ESM-2 config without its fields, or of an unknown family, is refused.
        let esm = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/esm2_t6_8M.yaml"),
        )
        .expect("readable");
        let e = ModelConfig::from_yaml_str(&esm.replace("rotary_base", "# rotary_base"))
            .expect_err("missing");
        assert!(e.contains("rotary_base is required"), "{e}");
        assert!(
            ModelConfig::from_yaml_str(&DNABERT_YAML.replace("dnabert_s\nc", "bert\nc")).is_err()
        );
        assert!(ModelConfig::from_yaml_str(&DNABERT_YAML.replace("1.0e-12", "0.0")).is_err());
    }

    fn esm_metadata_json() -> serde_json::Value {
        serde_json::json!({
            "format": "virnuc-trt-onnx/1",
            "model": {
                "name": "esm2_t6_8M", "checkpoint": "", "hf_repo": "", "num_layers": 6,
                "hidden_size": 320, "num_heads": 20, "ffn_size": 1280, "vocab_size": 33,
                "max_positions": 1026, "max_residues": 1022, "layer_norm_eps": 1e-5,
                "rotary_base": 10000.0, "token_dropout_scale": 0.88
            },
            "alphabet": alphabet::TOKENS.as_slice(),
            "attention": "masked", "fused": false, "precision": "fp32", "repr_layer": 6,
            "inputs": [], "outputs": [],
            "source": {"kind": "random", "path": null, "sha256": null, "seed": 0},
            "random_weights": true, "exporter_version": "0", "onnx_sha256": "00"
        })
    }

    #[test]
    fn old_metadata_without_family_is_esm2_and_families_are_checked() {
        let old: ModelMetadata = serde_json::from_value(esm_metadata_json()).expect("parses");
        assert_eq!(old.family, ModelFamily::Esm2);
        assert_eq!(old.pooling, Pooling::MeanResidues);
        assert_eq!(old.tokenizer, TokenizerSpec::Esm2Alphabet);
        old.check_family().expect("consistent");
        // Each disagreement is caught.
        let mut m = esm_metadata_json();
        m["pooling"] = "mean_all_tokens".into();
        let e = serde_json::from_value::<ModelMetadata>(m)
            .expect("parses")
            .check_family();
        assert!(e.expect_err("pooling").contains("pooling"));
        let mut m = esm_metadata_json();
        m["family"] = "dnabert_s".into();
        let e = serde_json::from_value::<ModelMetadata>(m)
            .expect("parses")
            .check_family();
        assert!(e.expect_err("family").contains("model config"));
        let mut m = esm_metadata_json();
        m["alphabet"] = serde_json::json!([]);
        let e = serde_json::from_value::<ModelMetadata>(m)
            .expect("parses")
            .check_family();
        assert!(e.expect_err("alphabet").contains("alphabet"));
        // A DNABERT-S export: its own config, tokenizer file, pooling; no alphabet.
        let dna = serde_json::json!({
            "family": "dnabert_s",
            "model": serde_json::to_value(ModelConfig::from_yaml_str(DNABERT_YAML).expect("valid")).expect("json"),
            "alphabet": [],
            "pooling": "mean_all_tokens",
            "tokenizer": {"kind": "hf_tokenizers", "file": "tokenizer.json", "sha256": "a".repeat(64)},
        });
        let mut m = esm_metadata_json();
        for (k, v) in dna.as_object().expect("object") {
            m[k] = v.clone();
        }
        let meta: ModelMetadata = serde_json::from_value(m.clone()).expect("parses");
        meta.check_family().expect("consistent");
        assert_eq!(meta.pooling, Pooling::MeanAllTokens);
        m["tokenizer"]["file"] = "../tokenizer.json".into();
        let e = serde_json::from_value::<ModelMetadata>(m.clone())
            .expect("parses")
            .check_family();
        assert!(e.expect_err("path").contains("inside the export folder"));
        m["tokenizer"] = serde_json::json!({"kind": "esm2_alphabet"});
        let e = serde_json::from_value::<ModelMetadata>(m)
            .expect("parses")
            .check_family();
        assert!(e.expect_err("tokenizer").contains("tokenizer"));
    }
}
