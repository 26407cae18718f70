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
        // model.json must be what the exporter wrote into the graph itself (cheap: the graph is
        // skipped, not read); `--skip-hash` only skips the sha256 of the whole file. After the
        // hash, which names the more common mistake (graph and metadata of two exports).
        let text = std::fs::read_to_string(&self.metadata)
            .map_err(|e| EngineError::Model(format!("cannot read {here}: {e}")))?;
        let embedded = onnx_metadata_props(&self.onnx)?
            .into_iter()
            .find(|(k, _)| k == METADATA_KEY)
            .map(|(_, v)| v);
        check_embedded_metadata(&text, embedded.as_deref(), &here.to_string(), &self.onnx)?;
        Ok(meta)
    }
}

/// `metadata_props` key under which the exporter stores the graph's own copy of `model.json`
/// (everything but `onnx_sha256`, which cannot be inside the file it hashes).
pub const METADATA_KEY: &str = virnuc_core::ONNX_METADATA_KEY;

/// Keys of `model.json` that are not in the embedded copy: the graph's hash, and what `build`
/// adds to an engine folder's copy.
const NOT_EMBEDDED: [&str; 2] = ["onnx_sha256", "engine"];

/// Checks `model.json` (`text`) against the metadata embedded in the graph; names the first field
/// that differs. A graph without embedded metadata is refused (re-export it).
pub fn check_embedded_metadata(
    text: &str,
    embedded: Option<&str>,
    here: &str,
    onnx: &Path,
) -> Result<()> {
    let Some(embedded) = embedded else {
        return Err(EngineError::Model(format!(
            "{} has no embedded metadata (`{METADATA_KEY}`): it was made by an older exporter, whose \
             model.json cannot be checked against the graph; re-export the model \
             (`python -m virnuc_export ...`)",
            onnx.display()
        )));
    };
    let bad = |m: String| EngineError::Model(format!("{here}: {m}"));
    let mut file: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let graph: serde_json::Value = serde_json::from_str(embedded).map_err(|e| {
        bad(format!(
            "the metadata embedded in {} is not JSON: {e}",
            onnx.display()
        ))
    })?;
    if let Some(obj) = file.as_object_mut() {
        for key in NOT_EMBEDDED {
            obj.remove(key);
        }
    }
    match first_difference(&file, &graph, "") {
        None => Ok(()),
        Some((field, now, then)) => Err(bad(format!(
            "metadata mismatch: `{field}` is {now} in model.json but {then} in the metadata the \
             exporter embedded in {} (model.json was edited, or comes from another export)",
            onnx.display()
        ))),
    }
}

/// The first field (dotted path) where `a` and `b` differ, with both values (`absent` if missing).
fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
    at: &str,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    let join = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    let show = |v: Option<&Value>| v.map_or_else(|| "absent".to_string(), |v| v.to_string());
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &join(k)),
                (p, q) => Some((join(k), show(p), show(q))),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some((at.to_string(), a.to_string(), b.to_string())),
    }
}

/// The `metadata_props` of an ONNX file, read by walking the top-level protobuf fields of its
/// `ModelProto` (field 14, `StringStringEntryProto { key = 1; value = 2 }`); the graph and other
/// fields are skipped by their length, so a gigabyte model costs a few reads.
pub fn onnx_metadata_props(path: &Path) -> Result<Vec<(String, String)>> {
    use std::io::BufReader;
    let bad = |m: String| EngineError::Model(format!("{}: not an ONNX model: {m}", path.display()));
    let file = std::fs::File::open(path)
        .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?
        .len();
    let mut r = BufReader::with_capacity(64 << 10, file);
    let mut props = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let (tag, n) = read_varint(&mut r).map_err(bad)?;
        pos += n;
        let (field, wire) = (tag >> 3, tag & 7);
        let skip = match wire {
            0 => {
                let (_, n) = read_varint(&mut r).map_err(bad)?;
                pos += n;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let (l, n) = read_varint(&mut r).map_err(bad)?;
                pos += n;
                if field == 14 {
                    let l = usize::try_from(l)
                        .ok()
                        .filter(|&l| l < (64 << 20))
                        .ok_or_else(|| bad(format!("metadata entry of {l} bytes")))?;
                    let mut entry = vec![0u8; l];
                    r.read_exact(&mut entry)
                        .map_err(|e| bad(format!("metadata entry: {e}")))?;
                    pos += l as u64;
                    props.push(parse_entry(&entry).map_err(bad)?);
                    0
                } else {
                    l
                }
            }
            w => return Err(bad(format!("wire type {w} at byte {pos}"))),
        };
        if skip > 0 {
            let off = i64::try_from(skip).map_err(|_| bad("field too long".into()))?;
            r.seek_relative(off)
                .map_err(|e| bad(format!("cannot skip a field: {e}")))?;
            pos += skip;
        }
    }
    if pos != len {
        return Err(bad("a field runs past the end of the file".into()));
    }
    Ok(props)
}

fn read_varint(r: &mut impl Read) -> std::result::Result<(u64, u64), String> {
    let mut value = 0u64;
    for i in 0..10u64 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)
            .map_err(|e| format!("truncated varint: {e}"))?;
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// `StringStringEntryProto` → (key, value).
fn parse_entry(mut b: &[u8]) -> std::result::Result<(String, String), String> {
    let (mut key, mut value) = (String::new(), String::new());
    while !b.is_empty() {
        let (tag, _) = read_varint(&mut b)?;
        if tag & 7 != 2 {
            return Err(format!("metadata entry field with wire type {}", tag & 7));
        }
        let (l, _) = read_varint(&mut b)?;
        let l = usize::try_from(l).map_err(|_| "entry too long".to_string())?;
        if l > b.len() {
            return Err("metadata entry runs past its end".into());
        }
        let text = String::from_utf8(b[..l].to_vec())
            .map_err(|_| "metadata entry is not UTF-8".to_string())?;
        match tag >> 3 {
            1 => key = text,
            2 => value = text,
            _ => {}
        }
        b = &b[l..];
    }
    Ok((key, value))
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

    /// A protobuf field: tag (field << 3 | wire type) and payload, encoded by hand.
    fn field(number: u64, wire: u64, payload: &[u8]) -> Vec<u8> {
        fn varint(mut v: u64, out: &mut Vec<u8>) {
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(b);
                    return;
                }
                out.push(b | 0x80);
            }
        }
        let mut out = Vec::new();
        varint(number << 3 | wire, &mut out);
        if wire == 2 {
            varint(payload.len() as u64, &mut out);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn metadata_props_are_found_past_a_large_graph_field() {
        let entry = |k: &str, v: &str| {
            let mut e = field(1, 2, k.as_bytes());
            e.extend(field(2, 2, v.as_bytes()));
            field(14, 2, &e)
        };
        let mut bytes = field(1, 0, &[8]); // ir_version 8
        bytes.extend(field(7, 2, &vec![0xAB; 300_000])); // "graph": skipped by length
        bytes.extend(entry("other", "x"));
        bytes.extend(field(5, 0, &[1])); // model_version
        bytes.extend(entry(METADATA_KEY, r#"{"a": 1}"#));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, &bytes).expect("write");
        let props = onnx_metadata_props(&path).expect("parses");
        assert_eq!(
            props,
            vec![
                ("other".to_string(), "x".to_string()),
                (METADATA_KEY.to_string(), r#"{"a": 1}"#.to_string())
            ]
        );
        // Cut inside the graph field: refused, not read as "no metadata".
        std::fs::write(&path, &bytes[..1000]).expect("write");
        assert!(onnx_metadata_props(&path).is_err());
    }

    #[test]
    fn an_edited_model_json_field_is_named() {
        let onnx = Path::new("m.onnx");
        let embedded = r#"{"model": {"name": "esm2_t6_8M", "hidden_size": 320}, "random_weights": true, "inputs": [{"name": "a"}]}"#;
        let same = r#"{"inputs": [{"name": "a"}], "random_weights": true, "onnx_sha256": "ab", "engine": {}, "model": {"hidden_size": 320, "name": "esm2_t6_8M"}}"#;
        check_embedded_metadata(same, Some(embedded), "model.json", onnx).expect("same");
        for (edited, field) in [
            (same.replace("true", "false"), "random_weights"),
            (same.replace("esm2_t6_8M", "esm2_t36_3B"), "model.name"),
            (
                same.replace(r#"[{"name": "a"}]"#, r#"[{"name": "b"}]"#),
                "inputs[0].name",
            ),
            (
                same.replace(r#""random_weights": true, "#, ""),
                "random_weights",
            ),
        ] {
            let e = check_embedded_metadata(&edited, Some(embedded), "model.json", onnx)
                .expect_err("edited");
            assert!(e.to_string().contains(&format!("`{field}`")), "{e}");
        }
        let e = check_embedded_metadata(same, None, "model.json", onnx).expect_err("old export");
        assert!(e.to_string().contains("re-export"), "{e}");
    }

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
