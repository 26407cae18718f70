//! CUDA graph capture on the CUDA execution provider, for the build's autotune.
//!
//! ONNX Runtime replays a captured CUDA graph only when every run has the same input shapes and the
//! same input and output buffer addresses, and every node runs on the CUDA provider. So each pack is
//! padded to exactly `budget` tokens and `max_seqs` sequences ([`crate::autotune::pad_to_shape`]),
//! the inputs live in device buffers allocated once and bound once, and each pack is copied into
//! them before the replay. The price is the padding (filler sequences); the gain is the launch
//! overhead of a few thousand kernels per pack. Which wins is measured per model and GPU: the build
//! records both and keeps graphs only when they are faster.
//!
//! Not exercised in CI (no GPU); `tools/gpu/build_gate.sh` on a GPU machine measures it.

use crate::manifest::AutotuneRow;
use crate::options::BuildOptions;
use virnuc_engine::Result;

#[cfg(feature = "cuda")]
mod enabled {
    use std::path::Path;
    use std::time::Instant;

    use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
    use ort::session::builder::GraphOptimizationLevel;
    use ort::session::{IoBinding, Session};
    use ort::value::Tensor;
    use virnuc_core::PackedBatch;

    use crate::autotune::{self, pad_to_shape};
    use crate::manifest::AutotuneRow;
    use crate::options::{BuildOptions, cuda_provider};
    use virnuc_engine::{
        Embeddings, EngineError, EngineInfo, ModelFiles, OrtContext, Result, check_session,
        custom_op, runtime,
    };

    /// Filler sequences stay within the rotary tables of every export (1026 positions).
    const FILLER_MAX_LEN: usize = 1024;

    /// A session replaying one CUDA graph at a fixed pack shape.
    pub(crate) struct GraphEngine {
        session: Session,
        binding: IoBinding,
        ids: Tensor<i64>,
        pos: Tensor<i64>,
        cu: Tensor<i32>,
        mean: Tensor<f32>,
        tokens: usize,
        seqs: usize,
        info: EngineInfo,
    }

    impl std::fmt::Debug for GraphEngine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GraphEngine")
                .field("tokens", &self.tokens)
                .field("seqs", &self.seqs)
                .finish_non_exhaustive()
        }
    }

    impl GraphEngine {
        pub(crate) fn open(
            dir: &Path,
            device_id: i32,
            tokens: usize,
            seqs: usize,
            ort_lib: Option<&Path>,
        ) -> Result<Self> {
            let library = runtime::init(ort_lib)?;
            let files = ModelFiles::locate(dir)?;
            let meta = files.load_metadata(true)?;
            let onnx = files.onnx.display().to_string();
            let env = runtime::environment()?;
            let ctx = || format!("CUDA graph session for {onnx}");
            let domain = custom_op::domain().ctx(|| "VarlenAttention op".into())?;
            let builder = Session::builder(env)
                .ctx(ctx)?
                .with_no_environment_execution_providers()
                .ctx(ctx)?
                .with_execution_providers(cuda_provider(device_id, true)?)
                .map_err(|e| EngineError::Provider {
                    ep: "cuda",
                    reason: format!("cannot be registered with CUDA graphs: {}", e.message()),
                })?
                .with_optimization_level(GraphOptimizationLevel::All)
                .ctx(ctx)?
                .with_operators(domain)
                .ctx(ctx)?;
            let session = custom_op::commit_session(builder, &files.onnx).ctx(ctx)?;
            check_session(&meta, &session, &onnx)?;
            let hidden = meta.model.hidden_size as usize;
            let device_memory = MemoryInfo::new(
                AllocationDevice::CUDA,
                device_id,
                AllocatorType::Device,
                MemoryType::Default,
            )
            .ctx(ctx)?;
            let alloc = Allocator::new(&session, device_memory).ctx(ctx)?;
            let ids = Tensor::<i64>::new(&alloc, [tokens]).ctx(ctx)?;
            let pos = Tensor::<i64>::new(&alloc, [tokens]).ctx(ctx)?;
            let cu = Tensor::<i32>::new(&alloc, [seqs + 1]).ctx(ctx)?;
            let mut mean = Tensor::<f32>::new(&alloc, [seqs, hidden]).ctx(ctx)?;
            // Bound once: the captured graph reads and writes these addresses on every replay.
            let mut binding = session.create_binding().ctx(ctx)?;
            binding.bind_input("input_ids", &ids).ctx(ctx)?;
            binding.bind_input("position_ids", &pos).ctx(ctx)?;
            binding.bind_input("cu_seqlens", &cu).ctx(ctx)?;
            binding.bind_output("mean", &mut mean).ctx(ctx)?;
            let info = EngineInfo {
                ep: "cuda",
                ep_note: Some(format!(
                    "CUDA graph at {tokens} tokens / {seqs} sequences per pack"
                )),
                hidden_size: hidden,
                metadata: meta,
                model_path: files.onnx.clone(),
                ort_library: library.path.clone(),
                ort_version: library.version.clone(),
                per_token: false,
            };
            Ok(Self {
                session,
                binding,
                ids,
                pos,
                cu,
                mean,
                tokens,
                seqs,
                info,
            })
        }
    }

    impl virnuc_engine::Engine for GraphEngine {
        fn embed(&mut self, batch: &PackedBatch) -> Result<Embeddings> {
            let padded =
                pad_to_shape(batch, self.tokens, self.seqs, FILLER_MAX_LEN).ok_or_else(|| {
                    EngineError::Batch(format!(
                        "a pack of {} tokens / {} sequences cannot be padded to {} / {}",
                        batch.num_tokens(),
                        batch.num_sequences(),
                        self.tokens,
                        self.seqs
                    ))
                })?;
            let copy_ctx = || "copy a pack into the CUDA graph's input buffers".to_string();
            Tensor::from_array(([self.tokens], padded.input_ids))
                .ctx(copy_ctx)?
                .copy_into(&mut self.ids)
                .ctx(copy_ctx)?;
            Tensor::from_array(([self.tokens], padded.position_ids))
                .ctx(copy_ctx)?
                .copy_into(&mut self.pos)
                .ctx(copy_ctx)?;
            Tensor::from_array(([self.seqs + 1], padded.cu_seqlens))
                .ctx(copy_ctx)?
                .copy_into(&mut self.cu)
                .ctx(copy_ctx)?;
            let start = Instant::now();
            let outputs = self
                .session
                .run_binding(&self.binding)
                .ctx(|| "CUDA graph run".into())?;
            drop(outputs);
            // The copy back runs on another stream: wait for the replay to finish first.
            self.binding
                .synchronize_outputs()
                .ctx(|| "synchronize the CUDA graph's outputs".into())?;
            let compute = start.elapsed();
            let host = self
                .mean
                .to(AllocationDevice::CPU, 0)
                .ctx(|| "copy `mean` back".into())?;
            let (_, data) = host.extract_tensor();
            let h = self.info.hidden_size;
            let mean = data[..batch.num_sequences() * h].to_vec();
            Ok(Embeddings {
                mean,
                hidden: None,
                hidden_size: h,
                compute,
            })
        }

        fn info(&self) -> &EngineInfo {
            &self.info
        }
    }

    pub(crate) fn rows(
        options: &BuildOptions,
        out: &Path,
        budgets: &[usize],
        log: &mut dyn FnMut(&str),
    ) -> Result<Vec<AutotuneRow>> {
        let mut rows = Vec::new();
        let mut failed: Option<String> = None;
        for &budget in budgets {
            let seqs = autotune::graph_max_seqs(budget).max(2);
            let row = |tokens_per_s, packs, seconds, error| AutotuneRow {
                budget,
                cuda_graph: true,
                tokens_per_s,
                packs,
                seconds,
                gpu_memory_used_mib: crate::manifest::gpu_memory_used_mib(options.device_id),
                error,
            };
            if let Some(why) = &failed {
                rows.push(row(None, 0, 0.0, Some(format!("skipped: {why}"))));
                continue;
            }
            let result = GraphEngine::open(
                out,
                options.device_id,
                budget,
                seqs,
                options.ort_lib.as_deref(),
            )
            .and_then(|mut engine| {
                let packs = autotune::synthetic_packs(budget, 8, budget as u64, Some(seqs), true);
                // ONNX Runtime runs once normally, captures on the next run, then replays.
                virnuc_engine::Engine::embed(&mut engine, &packs[0])?;
                autotune::measure(&mut engine, &packs, options.autotune_seconds, 3)
            });
            let r = match result {
                Ok((speed, n, secs)) => row(Some(speed), n, secs, None),
                Err(e) => {
                    failed = Some(format!("budget {budget} failed with CUDA graphs"));
                    row(None, 0, 0.0, Some(e.to_string()))
                }
            };
            log(&format!(
                "  budget {budget}, CUDA graph: {}",
                r.tokens_per_s.map_or_else(
                    || r.error.clone().unwrap_or_default(),
                    |s| format!("{s:.0} tokens/s")
                )
            ));
            rows.push(r);
        }
        Ok(rows)
    }
}

/// Times every budget with CUDA graphs (rows with `cuda_graph: true`); a failure is a row, not an
/// error, so the build keeps the plain measurement.
pub(crate) fn autotune_graph_rows(
    options: &BuildOptions,
    out: &std::path::Path,
    budgets: &[usize],
    log: &mut dyn FnMut(&str),
) -> Result<Vec<AutotuneRow>> {
    #[cfg(feature = "cuda")]
    {
        enabled::rows(options, out, budgets, log)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (options, out, budgets, log);
        Ok(Vec::new())
    }
}
