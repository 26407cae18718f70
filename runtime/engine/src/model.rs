//! The model on disk (`model.onnx` + `model.json`) and the checks that it is what the metadata says.

use std::io::Read;
use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use sha2::{Digest, Sha256};
use virnuc_core::{ModelMetadata, TensorSpec, TokenizerSpec};

use crate::{EngineError, Result};

/// The metadata format this runtime reads.
pub const METADATA_FORMAT: &str = "virnuc-trt-onnx/1";
/// Graph inputs every exported model has, in order (see `export/`).
pub const INPUTS: [(&str, &str); 3] = [
    ("input_ids", "int64"),
    ("position_ids", "int64"),
    ("cu_seqlens", "int32"),
];

/// Where a model's graph and metadata are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub onnx: PathBuf,
    pub metadata: PathBuf,
}

impl ModelFiles {
    /// `DIR` → `DIR/model.onnx` + `DIR/model.json`; `X.onnx` → `X.onnx` + `X.json` or `model.json` beside it.
    pub fn locate(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let files = Self {
                onnx: path.join("model.onnx"),
                metadata: path.join("model.json"),
            };
            for f in [&files.onnx, &files.metadata] {
                if !f.is_file() {
                    return Err(EngineError::Model(format!(
                        "model folder {} has no {}",
                        path.display(),
                        f.file_name().and_then(|s| s.to_str()).unwrap_or("?")
                    )));
                }
            }
            return Ok(files);
        }
        if !path.is_file() {
            return Err(EngineError::Model(format!(
                "model {} does not exist (give a folder with model.onnx + model.json, or a .onnx file)",
                path.display()
            )));
        }
        let beside = path.with_extension("json");
        let default = path.with_file_name("model.json");
        let metadata = [beside, default]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                EngineError::Model(format!(
                    "no metadata for {}: expected {} or model.json beside it (written by the exporter)",
                    path.display(),
                    path.with_extension("json").display()
                ))
            })?;
        Ok(Self {
            onnx: path.to_path_buf(),
            metadata,
        })
    }

    /// Reads `model.json` and checks it against the runtime and the `.onnx` file.
    pub fn load_metadata(&self, skip_hash: bool) -> Result<ModelMetadata> {
        let meta = ModelMetadata::from_json_file(&self.metadata)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let here = self.metadata.display();
        if meta.format != METADATA_FORMAT {
            return Err(EngineError::Model(format!(
                "{here}: format `{}`, this runtime reads `{METADATA_FORMAT}`",
                meta.format
            )));
        }
        meta.check_family()
            .map_err(|m| EngineError::Model(format!("{here}: {m}")))?;
        if let Some(tokenizer) = self.tokenizer_file(&meta) {
            // Small, and the ids depend on every byte of it: always checked.
            let actual = sha256_file(&tokenizer)?;
            if let TokenizerSpec::HfTokenizers { sha256, .. } = &meta.tokenizer
                && !actual.eq_ignore_ascii_case(sha256)
            {
                return Err(EngineError::Model(format!(
                    "{} does not match its metadata {here}: sha256 {actual}, metadata says {sha256}",
                    tokenizer.display()
                )));
            }
        }
        if !skip_hash {
            let actual = sha256_file(&self.onnx)?;
            if !actual.eq_ignore_ascii_case(&meta.onnx_sha256) {
                return Err(EngineError::Model(format!(
                    "{} does not match its metadata {here}: sha256 {actual}, metadata says {} \
                     (graph and metadata come from different exports)",
                    self.onnx.display(),
                    meta.onnx_sha256
                )));
            }
        }
        Ok(meta)
    }
}

impl ModelFiles {
    /// The tokenizer file the metadata names, beside the metadata (`None` for the ESM-2 alphabet).
    pub fn tokenizer_file(&self, meta: &ModelMetadata) -> Option<PathBuf> {
        match &meta.tokenizer {
            TokenizerSpec::Esm2Alphabet => None,
            TokenizerSpec::HfTokenizers { file, .. } => {
                Some(self.metadata.parent().unwrap_or(Path::new(".")).join(file))
            }
        }
    }
}

/// Streams a file through sha256 (models can be gigabytes).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub(crate) fn dtype_name(t: TensorElementType) -> &'static str {
    match t {
        TensorElementType::Int64 => "int64",
        TensorElementType::Int32 => "int32",
        TensorElementType::Float32 => "float32",
        TensorElementType::Float16 => "float16",
        TensorElementType::Bfloat16 => "bfloat16",
        _ => "other",
    }
}

/// A graph tensor as the session sees it: name, dtype and dims (-1 for symbolic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphTensor {
    pub name: String,
    pub dtype: String,
    pub dims: Vec<i64>,
}

pub(crate) fn graph_tensors(outlets: &[ort::value::Outlet]) -> Vec<GraphTensor> {
    outlets
        .iter()
        .map(|o| match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => GraphTensor {
                name: o.name().to_string(),
                dtype: dtype_name(*ty).to_string(),
                dims: shape.iter().copied().collect(),
            },
            _ => GraphTensor {
                name: o.name().to_string(),
                dtype: "non-tensor".into(),
                dims: vec![],
            },
        })
        .collect()
}

/// Checks the session's graph against the metadata: inputs and outputs by name, dtype and order,
/// the fixed input contract, and the hidden size of `mean`. Pure, so it is tested without a model.
pub fn check_graph_against_metadata(
    meta: &ModelMetadata,
    inputs: &[GraphTensor],
    outputs: &[GraphTensor],
    where_: &str,
) -> Result<()> {
    let mismatch = |what: String| {
        Err(EngineError::Model(format!(
            "model/metadata mismatch in {where_}: {what}"
        )))
    };
    let fmt = |ts: &[GraphTensor]| {
        ts.iter()
            .map(|t| format!("{}:{}", t.name, t.dtype))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fmt_spec = |ts: &[TensorSpec]| {
        ts.iter()
            .map(|t| format!("{}:{}", t.name, t.dtype))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let same = |g: &[GraphTensor], m: &[TensorSpec]| {
        g.len() == m.len()
            && g.iter()
                .zip(m)
                .all(|(a, b)| a.name == b.name && a.dtype == b.dtype)
    };
    if !same(inputs, &meta.inputs) {
        return mismatch(format!(
            "graph inputs [{}], metadata says [{}]",
            fmt(inputs),
            fmt_spec(&meta.inputs)
        ));
    }
    let want: Vec<String> = INPUTS.iter().map(|(n, d)| format!("{n}:{d}")).collect();
    let got: Vec<String> = inputs
        .iter()
        .map(|t| format!("{}:{}", t.name, t.dtype))
        .collect();
    if got != want {
        return mismatch(format!(
            "graph inputs [{}], this runtime feeds [{}]",
            got.join(", "),
            want.join(", ")
        ));
    }
    if !same(outputs, &meta.outputs) {
        return mismatch(format!(
            "graph outputs [{}], metadata says [{}]",
            fmt(outputs),
            fmt_spec(&meta.outputs)
        ));
    }
    let hidden = i64::from(meta.model.hidden_size);
    for t in outputs {
        let ok_dtype = matches!(t.dtype.as_str(), "float32" | "float16");
        if (t.name == "mean" || t.name == "hidden") && !ok_dtype {
            return mismatch(format!("output {} is {}, expected float", t.name, t.dtype));
        }
        if (t.name == "mean" || t.name == "hidden")
            && t.dims.len() == 2
            && t.dims[1] >= 0
            && t.dims[1] != hidden
        {
            return mismatch(format!(
                "output {} has {} columns, metadata hidden_size is {hidden}",
                t.name, t.dims[1]
            ));
        }
    }
    if !outputs.iter().any(|t| t.name == "mean") {
        return mismatch("the graph has no `mean` output".into());
    }
    Ok(())
}

/// Checks an opened session's inputs and outputs against the model metadata (`where_` names the step).
pub fn check_session(meta: &ModelMetadata, session: &Session, where_: &str) -> Result<()> {
    check_graph_against_metadata(
        meta,
        &graph_tensors(session.inputs()),
        &graph_tensors(session.outputs()),
        where_,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use virnuc_core::{ModelConfig, ModelFamily, ModelSource, Pooling, TokenizerSpec, alphabet};

    fn spec(name: &str, dtype: &str, shape: &[&str]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: dtype.into(),
            shape: shape.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn gt(name: &str, dtype: &str, dims: &[i64]) -> GraphTensor {
        GraphTensor {
            name: name.into(),
            dtype: dtype.into(),
            dims: dims.to_vec(),
        }
    }

    fn meta() -> ModelMetadata {
        let yaml = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/esm2_t6_8M.yaml"),
        )
        .expect("model yaml");
        ModelMetadata {
            format: METADATA_FORMAT.into(),
            family: ModelFamily::Esm2,
            model: ModelConfig::from_yaml_str(&yaml).expect("valid"),
            tokenizer: TokenizerSpec::Esm2Alphabet,
            alphabet: alphabet::TOKENS.iter().map(|s| s.to_string()).collect(),
            pooling: Pooling::MeanResidues,
            attention: "masked".into(),
            fused: false,
            precision: "fp32".into(),
            repr_layer: 6,
            inputs: vec![
                spec("input_ids", "int64", &["T"]),
                spec("position_ids", "int64", &["T"]),
                spec("cu_seqlens", "int32", &["B+1"]),
            ],
            outputs: vec![spec("mean", "float32", &["B", "320"])],
            source: ModelSource {
                kind: "random".into(),
                path: None,
                sha256: None,
                seed: Some(0),
            },
            random_weights: true,
            exporter_version: "test".into(),
            onnx_sha256: String::new(),
        }
    }

    fn good_inputs() -> Vec<GraphTensor> {
        vec![
            gt("input_ids", "int64", &[-1]),
            gt("position_ids", "int64", &[-1]),
            gt("cu_seqlens", "int32", &[-1]),
        ]
    }

    #[test]
    fn matching_graph_passes_and_each_mismatch_is_named() {
        let m = meta();
        let outs = vec![gt("mean", "float32", &[-1, 320])];
        check_graph_against_metadata(&m, &good_inputs(), &outs, "x").expect("matches");

        let wrong_hidden = vec![gt("mean", "float32", &[-1, 480])];
        let e = check_graph_against_metadata(&m, &good_inputs(), &wrong_hidden, "x")
            .expect_err("hidden size differs");
        assert!(e.to_string().contains("480"), "{e}");

        let mut swapped = good_inputs();
        swapped.swap(0, 1);
        assert!(check_graph_against_metadata(&m, &swapped, &outs, "x").is_err());

        let mut wrong_type = good_inputs();
        wrong_type[2].dtype = "int64".into();
        let e = check_graph_against_metadata(&m, &wrong_type, &outs, "x").expect_err("dtype");
        assert!(e.to_string().contains("cu_seqlens:int64"), "{e}");

        let extra = vec![
            gt("mean", "float32", &[-1, 320]),
            gt("hidden", "float32", &[-1, 320]),
        ];
        assert!(check_graph_against_metadata(&m, &good_inputs(), &extra, "x").is_err());
    }

    #[test]
    fn locate_reports_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = ModelFiles::locate(dir.path()).expect_err("empty folder");
        assert!(e.to_string().contains("model.onnx"), "{e}");
        let e = ModelFiles::locate(&dir.path().join("nope.onnx")).expect_err("no file");
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::write(dir.path().join("m.onnx"), b"x").expect("write");
        let e = ModelFiles::locate(&dir.path().join("m.onnx")).expect_err("no metadata");
        assert!(e.to_string().contains("no metadata"), "{e}");
        std::fs::write(dir.path().join("model.json"), b"{}").expect("write");
        let files = ModelFiles::locate(&dir.path().join("m.onnx")).expect("found");
        assert_eq!(files.metadata, dir.path().join("model.json"));
    }

    #[test]
    fn sha256_of_known_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").expect("write");
        assert_eq!(
            sha256_file(&p).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
