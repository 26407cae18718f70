//! The ONNX Runtime session shared by every provider, and the plain (host-memory) engine used on
//! the CPU provider.

use std::time::Instant;

use ort::ep::ExecutionProviderDispatch;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{OutputSelector, RunOptions, Session};
use ort::value::{DynValue, Tensor};
use virnuc_core::{ModelMetadata, PackedBatch};

use crate::model::{ModelFiles, check_session};
use crate::runtime::{OrtLibrary, environment};
use crate::{Embeddings, EngineError, EngineInfo, EngineOptions, OrtContext, Result, custom_op};

/// Builds a session on `eps` (registered with `error_on_failure`: a provider that cannot be
/// registered is an error, never a quiet CPU run) with the VarlenAttention CPU op available, plus
/// its CUDA kernel on GPU sessions of `virnuc`-flavor models. Returns a note for the user when the
/// session runs with less than asked (TensorRT without the CUDA kernel).
pub(crate) fn build_session(
    options: &EngineOptions,
    files: &ModelFiles,
    meta: &ModelMetadata,
    ep_label: &'static str,
    eps: Vec<ExecutionProviderDispatch>,
) -> Result<(Session, Option<String>)> {
    let env = environment()?;
    let onnx = files.onnx.display().to_string();
    let eps: Vec<_> = eps.into_iter().map(|e| e.error_on_failure()).collect();
    let mut builder = Session::builder(env)
        .ctx(|| "cannot create ONNX Runtime session options".into())?
        .with_no_environment_execution_providers()
        .ctx(|| "session options".into())?;
    if !eps.is_empty() {
        builder = builder
            .with_execution_providers(eps)
            .map_err(|e| EngineError::Provider {
                ep: ep_label,
                reason: format!(
                    "cannot be registered: {} (the ONNX Runtime library in use may be a CPU-only build; \
                     the GPU one is the onnxruntime-gpu wheel, see --ort-lib)",
                    e.message()
                ),
            })?;
    }
    builder = builder
        .with_optimization_level(GraphOptimizationLevel::All)
        .ctx(|| "session options".into())?;
    if options.intra_threads > 0 {
        builder = builder
            .with_intra_threads(options.intra_threads)
            .ctx(|| "session options".into())?;
    }
    // On the CPU provider, ONNX Runtime's idle intra-op threads spin by default, on the same cores
    // that the VarlenAttention op's rayon threads then need: with spinning off, `embed --ep cpu` ran
    // 1.05-1.12x faster on the 2-core machine (BENCHMARKS.md, "CPU end to end").
    // `VIRNUC_ORT_SPIN=1` restores ONNX Runtime's default, for that comparison.
    if ep_label == "cpu" && std::env::var("VIRNUC_ORT_SPIN").map_or(true, |v| v != "1") {
        builder = builder
            .with_intra_op_spinning(false)
            .ctx(|| "session options".into())?;
    }
    let domain = custom_op::domain().ctx(|| "cannot build the VarlenAttention op".into())?;
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut note = None;
    // GPU sessions of the `virnuc` flavor get the CUDA kernel in the same `com.virnuc` domain
    // (ONNX Runtime takes one domain object per name); the CPU op stays for nodes placed on the CPU.
    #[cfg(feature = "cuda")]
    let domain = if ep_label != "cpu" && meta.attention == "virnuc" {
        match crate::kernel_dir::add_cuda_op(domain, options.kernel_dir.as_deref(), ep_label) {
            Ok(d) => d,
            // On TensorRT the VarlenAttention plugin usually takes these nodes inside the engine;
            // the CUDA kernel is only the fallback, so its absence is a warning there.
            Err(e) if ep_label == "tensorrt" => {
                note = Some(format!(
                    "{e}; VarlenAttention nodes that TensorRT does not take run on the CPU op (slow)"
                ));
                custom_op::domain().ctx(|| "cannot build the VarlenAttention op".into())?
            }
            Err(e) => return Err(e),
        }
    } else {
        domain
    };
    builder = builder
        .with_operators(domain)
        .ctx(|| "cannot register the VarlenAttention op".into())?;
    let session = custom_op::commit_session(builder, &files.onnx).map_err(|e| {
        let msg = e.message().to_string();
        if ep_label != "cpu" && looks_like_provider_failure(&msg) {
            EngineError::Provider {
                ep: ep_label,
                reason: format!("session creation failed for {onnx}: {msg}"),
            }
        } else {
            EngineError::Ort {
                context: format!("cannot load {onnx}"),
                source: ort::Error::new(msg),
            }
        }
    })?;
    check_session(meta, &session, &onnx)?;
    Ok((session, note))
}

/// Device errors at session creation (no GPU, no driver, missing CUDA/TensorRT libraries).
fn looks_like_provider_failure(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "cuda", "cudnn", "cublas", "nvinfer", "tensorrt", "gpu", "driver", "device",
    ]
    .iter()
    .any(|k| m.contains(k))
}

/// Checks a pack before it reaches ONNX Runtime (a malformed pack would fail deep inside a kernel).
pub(crate) fn check_batch(batch: &PackedBatch, vocab: u32) -> Result<()> {
    let t = batch.input_ids.len();
    if batch.is_empty() || t == 0 {
        return Err(EngineError::Batch("empty pack".into()));
    }
    if batch.position_ids.len() != t {
        return Err(EngineError::Batch(format!(
            "{} position ids for {t} tokens",
            batch.position_ids.len()
        )));
    }
    if batch.cu_seqlens.len() != batch.sequences.len() + 1
        || batch.cu_seqlens.first() != Some(&0)
        || batch.cu_seqlens.last().map(|&x| x as usize) != Some(t)
        || batch.cu_seqlens.windows(2).any(|w| w[1] < w[0] + 3)
    {
        return Err(EngineError::Batch(
            "cu_seqlens must start at 0, end at the token count and give each sequence <cls> + ≥1 residue + <eos>"
                .into(),
        ));
    }
    if let Some(bad) = batch
        .input_ids
        .iter()
        .find(|&&x| x < 0 || x >= i64::from(vocab))
    {
        return Err(EngineError::Batch(format!(
            "token id {bad} outside the vocabulary"
        )));
    }
    Ok(())
}

/// The engine's outputs as [`Embeddings`], after checking they have the pack's shape
/// (`mean` [B, H], `hidden` [T, H]); every engine returns through here.
pub(crate) fn checked_embeddings(
    batch: &PackedBatch,
    h: usize,
    mean: Vec<f32>,
    hidden: Option<Vec<f32>>,
    compute: std::time::Duration,
) -> Result<Embeddings> {
    let (b, t) = (batch.num_sequences(), batch.num_tokens());
    if mean.len() != b * h {
        return Err(EngineError::Model(format!(
            "`mean` has {} values, expected {b} x {h}",
            mean.len()
        )));
    }
    if let Some(hidden) = &hidden
        && hidden.len() != t * h
    {
        return Err(EngineError::Model(format!(
            "`hidden` has {} values, expected {t} x {h}",
            hidden.len()
        )));
    }
    Ok(Embeddings {
        mean,
        hidden,
        hidden_size: h,
        compute,
    })
}

/// Reads a float output (f32 or f16) into f32.
pub(crate) fn to_f32(value: &DynValue, name: &str) -> Result<Vec<f32>> {
    if let Ok((_, data)) = value.try_extract_tensor::<f32>() {
        return Ok(data.to_vec());
    }
    let (_, data) = value
        .try_extract_tensor::<half::f16>()
        .ctx(|| format!("output {name} is neither float32 nor float16"))?;
    Ok(data.iter().map(|x| x.to_f32()).collect())
}

pub(crate) fn make_info(
    options: &EngineOptions,
    files: &ModelFiles,
    metadata: ModelMetadata,
    library: &OrtLibrary,
    ep: &'static str,
    session: &Session,
) -> Result<EngineInfo> {
    let has_hidden = session.outputs().iter().any(|o| o.name() == "hidden");
    if options.per_token && !has_hidden {
        return Err(EngineError::Model(format!(
            "per-token states asked for, but {} has no `hidden` output (export with per-token output)",
            files.onnx.display()
        )));
    }
    Ok(EngineInfo {
        ep,
        ep_note: None,
        hidden_size: metadata.model.hidden_size as usize,
        metadata,
        model_path: files.onnx.clone(),
        ort_library: library.path.clone(),
        ort_version: library.version.clone(),
        per_token: options.per_token,
    })
}

/// The engine for the CPU provider: inputs and outputs in ordinary host memory.
#[derive(Debug)]
pub(crate) struct OrtEngine {
    session: Session,
    info: EngineInfo,
}

impl OrtEngine {
    pub(crate) fn open_cpu(
        options: &EngineOptions,
        files: &ModelFiles,
        metadata: ModelMetadata,
        library: &OrtLibrary,
    ) -> Result<Self> {
        let (session, _) = build_session(
            options,
            files,
            &metadata,
            "cpu",
            vec![ort::ep::CPU::default().build()],
        )?;
        let info = make_info(options, files, metadata, library, "cpu", &session)?;
        Ok(Self { session, info })
    }

    pub(crate) fn set_note(&mut self, note: String) {
        self.info.ep_note = Some(note);
    }
}

impl crate::Engine for OrtEngine {
    fn embed(&mut self, batch: &PackedBatch) -> Result<Embeddings> {
        check_batch(batch, self.info.metadata.model.vocab_size)?;
        let t = batch.num_tokens();
        let ids = Tensor::from_array(([t], batch.input_ids.clone())).ctx(|| "input_ids".into())?;
        let pos =
            Tensor::from_array(([t], batch.position_ids.clone())).ctx(|| "position_ids".into())?;
        let cu = Tensor::from_array(([batch.cu_seqlens.len()], batch.cu_seqlens.clone()))
            .ctx(|| "cu_seqlens".into())?;
        let mut selector = OutputSelector::no_default().with("mean");
        if self.info.per_token {
            selector = selector.with("hidden");
        }
        let run_options = RunOptions::new()
            .ctx(|| "run options".into())?
            .with_outputs(selector);
        let start = Instant::now();
        let outputs = self
            .session
            .run_with_options(
                ort::inputs![
                    "input_ids" => ids,
                    "position_ids" => pos,
                    "cu_seqlens" => cu
                ],
                &run_options,
            )
            .ctx(|| {
                format!(
                    "inference failed on a pack of {} sequences / {t} tokens (first id {})",
                    batch.num_sequences(),
                    batch.sequences[0].id
                )
            })?;
        let compute = start.elapsed();
        let h = self.info.hidden_size;
        let mean_v = outputs
            .get("mean")
            .ok_or_else(|| EngineError::Model("the run returned no `mean`".into()))?;
        let mean = to_f32(mean_v, "mean")?;
        let hidden = if self.info.per_token {
            let v = outputs
                .get("hidden")
                .ok_or_else(|| EngineError::Model("the run returned no `hidden`".into()))?;
            Some(to_f32(v, "hidden")?)
        } else {
            None
        };
        checked_embeddings(batch, h, mean, hidden, compute)
    }

    fn info(&self) -> &EngineInfo {
        &self.info
    }
}
