//! The GPU data path on the CUDA execution provider (and TensorRT, which shares it).
//!
//! Per pack: the token arrays are staged into page-locked host buffers (ONNX Runtime's
//! `CUDA_PINNED` allocator, an arena, so buffers are reused across packs), copied to device
//! memory and bound with an `IoBinding`, the graph runs on the device, and only the pooled output
//! (`mean`, plus `hidden` when asked) comes back. Two bindings
//! alternate so that the output values of pack N stay valid while pack N+1 is bound.
//!
//! Overlap with the CPU side comes from the threads around the engine: the loader and packer
//! prepare pack N+1 while this engine runs pack N on its own OS thread ([`crate::EngineThread`]),
//! and the writer thread stores pack N−1. Staging here is a memcpy of ~16 bytes a token, small next
//! to the run; [`Embeddings::compute`] against wall time gives the GPU busy share.
//!
//! Output placement: by default outputs are bound to `CUDA_PINNED` host memory, so ONNX Runtime
//! copies them back at the end of the run on its own stream. With `VIRNUC_OUTPUT_ON_DEVICE=1` they are
//! bound to device memory and copied back with a separate device-to-pinned copy; with
//! `VIRNUC_INPUTS_ON_DEVICE=0` the pinned inputs are bound as they are (both for comparison on the
//! GPU machine).

use std::time::Instant;

use ort::ep::{CUDA, ExecutionProviderDispatch};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensorValueType, Tensor};
use virnuc_core::{ModelMetadata, PackedBatch};

use crate::model::ModelFiles;
use crate::ort_engine::{build_session, check_batch, checked_embeddings, make_info, to_f32};
use crate::runtime::OrtLibrary;
use crate::{Embeddings, EngineError, EngineInfo, EngineOptions, OrtContext, Result};

/// Engine on the CUDA provider with pinned inputs and IoBinding.
pub(crate) struct CudaEngine {
    session: Session,
    info: EngineInfo,
    pinned: Allocator,
    output_memory: MemoryInfo<'static>,
    output_on_device: bool,
    inputs_on_device: bool,
    device_id: i32,
    bindings: [IoBinding; 2],
    next: usize,
}

impl std::fmt::Debug for CudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaEngine")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl CudaEngine {
    pub(crate) fn open(
        options: &EngineOptions,
        files: &ModelFiles,
        metadata: ModelMetadata,
        library: &OrtLibrary,
    ) -> Result<Self> {
        let cuda = CUDA::default().with_device_id(options.device_id).build();
        Self::open_with(options, files, metadata, library, "cuda", vec![cuda])
    }

    pub(crate) fn open_with(
        options: &EngineOptions,
        files: &ModelFiles,
        metadata: ModelMetadata,
        library: &OrtLibrary,
        label: &'static str,
        eps: Vec<ExecutionProviderDispatch>,
    ) -> Result<Self> {
        let (session, note) = build_session(options, files, &metadata, label, eps)?;
        let mut info = make_info(options, files, metadata, library, label, &session)?;
        info.ep_note = note;
        let provider = |what: &str, e: ort::Error| EngineError::Provider {
            ep: label,
            reason: format!("{what}: {}", e.message()),
        };
        let pinned_info = MemoryInfo::new(
            AllocationDevice::CUDA_PINNED,
            0,
            AllocatorType::Device,
            MemoryType::CPUInput,
        )
        .map_err(|e| provider("pinned memory info", e))?;
        let pinned = Allocator::new(&session, pinned_info)
            .map_err(|e| provider("pinned host allocator", e))?;
        let output_on_device = std::env::var("VIRNUC_OUTPUT_ON_DEVICE").is_ok_and(|v| v == "1");
        // Inputs go to device memory before binding. Bound as pinned host memory, ONNX Runtime hands
        // them to CUDA kernels as they are, and the kernels that read them (66 RotaryEmbedding
        // nodes per 650M pack read `position_ids`) then fetch across PCIe: the `ort` flavor ran at
        // 190k instead of 260k tokens/s on an H200 (BENCHMARKS.md, "Input placement").
        // `VIRNUC_INPUTS_ON_DEVICE=0` keeps them pinned, for that comparison.
        let inputs_on_device = std::env::var("VIRNUC_INPUTS_ON_DEVICE").map_or(true, |v| v != "0");
        let output_memory = if output_on_device {
            MemoryInfo::new(
                AllocationDevice::CUDA,
                options.device_id,
                AllocatorType::Device,
                MemoryType::Default,
            )
        } else {
            MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                0,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )
        }
        .map_err(|e| provider("output memory info", e))?;
        let bindings = [
            session
                .create_binding()
                .map_err(|e| provider("IoBinding", e))?,
            session
                .create_binding()
                .map_err(|e| provider("IoBinding", e))?,
        ];
        Ok(Self {
            session,
            info,
            pinned,
            output_memory,
            output_on_device,
            inputs_on_device,
            device_id: options.device_id,
            bindings,
            next: 0,
        })
    }

    pub(crate) fn set_note(&mut self, note: String) {
        self.info.ep_note = Some(note);
    }

    /// A page-locked host tensor holding `data`.
    fn stage<T>(&self, data: &[T], name: &str) -> Result<Tensor<T>>
    where
        T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug,
    {
        let mut t = Tensor::<T>::new(&self.pinned, [data.len()])
            .ctx(|| format!("cannot allocate pinned host memory for {name}"))?;
        t.extract_tensor_mut().1.copy_from_slice(data);
        if !self.inputs_on_device {
            return Ok(t);
        }
        t.to(AllocationDevice::CUDA, self.device_id)
            .ctx(|| format!("cannot copy {name} to the device"))
    }

    fn fetch(&self, value: ort::value::DynValue, name: &str) -> Result<Vec<f32>> {
        if !self.output_on_device {
            return to_f32(&value, name);
        }
        let tensor = value
            .downcast::<DynTensorValueType>()
            .ctx(|| format!("output {name} is not a tensor"))?;
        let host = tensor
            .to(AllocationDevice::CUDA_PINNED, self.device_id)
            .ctx(|| format!("cannot copy {name} back from the device"))?;
        to_f32(&host.into_dyn(), name)
    }
}

impl crate::Engine for CudaEngine {
    fn embed(&mut self, batch: &PackedBatch) -> Result<Embeddings> {
        check_batch(batch, self.info.metadata.model.vocab_size)?;
        check_ort_flavor_pack(batch, &self.info.metadata.attention)?;
        let t = batch.num_tokens();
        let ids = self.stage(&batch.input_ids, "input_ids")?;
        let pos = self.stage(&batch.position_ids, "position_ids")?;
        let cu = self.stage(&batch.cu_seqlens, "cu_seqlens")?;
        let per_token = self.info.per_token;
        let slot = self.next;
        self.next ^= 1;
        let binding = &mut self.bindings[slot];
        binding.clear();
        binding
            .bind_input("input_ids", &ids)
            .ctx(|| "bind input_ids".into())?;
        binding
            .bind_input("position_ids", &pos)
            .ctx(|| "bind position_ids".into())?;
        binding
            .bind_input("cu_seqlens", &cu)
            .ctx(|| "bind cu_seqlens".into())?;
        binding
            .bind_output_to_device("mean", &self.output_memory)
            .ctx(|| "bind mean".into())?;
        if per_token {
            binding
                .bind_output_to_device("hidden", &self.output_memory)
                .ctx(|| "bind hidden".into())?;
        }
        let start = Instant::now();
        let mut outputs = self.session.run_binding(&self.bindings[slot]).ctx(|| {
            format!(
                "inference failed on a pack of {} sequences / {t} tokens (first id {})",
                batch.num_sequences(),
                batch.sequences[0].id
            )
        })?;
        let mean_v = outputs
            .remove("mean")
            .ok_or_else(|| EngineError::Model("the run returned no `mean`".into()))?;
        let hidden_v = if per_token {
            Some(
                outputs
                    .remove("hidden")
                    .ok_or_else(|| EngineError::Model("the run returned no `hidden`".into()))?,
            )
        } else {
            None
        };
        drop(outputs);
        self.bindings[slot]
            .synchronize_outputs()
            .ctx(|| "synchronize outputs".into())?;
        let compute = start.elapsed();
        let h = self.info.hidden_size;
        let mean = self.fetch(mean_v, "mean")?;
        let hidden = match hidden_v {
            Some(v) => Some(self.fetch(v, "hidden")?),
            None => None,
        };
        checked_embeddings(batch, h, mean, hidden, compute)
    }

    fn info(&self) -> &EngineInfo {
        &self.info
    }
}

/// ONNX Runtime's CUDA `RotaryEmbedding` puts the token axis on a grid dimension limited to 65535
/// (seen on an H200 with ORT 1.31.1: "CUDA failure 1: invalid argument" for a 65536-token pack), so
/// `ort`-flavor graphs take at most that many tokens per pack. The `virnuc` flavor has no such limit.
pub(crate) const ORT_FLAVOR_MAX_PACK_TOKENS: usize = 65_535;

pub(crate) fn check_ort_flavor_pack(batch: &PackedBatch, attention: &str) -> Result<()> {
    if attention == "ort" && batch.num_tokens() > ORT_FLAVOR_MAX_PACK_TOKENS {
        return Err(EngineError::Batch(format!(
            "a pack of {} tokens is over the {ORT_FLAVOR_MAX_PACK_TOKENS} that the `ort` attention flavor \
             takes on CUDA (ONNX Runtime's RotaryEmbedding kernel): use --toks-per-batch {ORT_FLAVOR_MAX_PACK_TOKENS} \
             or less, or export with --attention virnuc",
            batch.num_tokens()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod ort_flavor_tests {
    use super::*;
    use virnuc_core::{SequenceMeta, alphabet};

    fn pack_of(tokens: usize) -> PackedBatch {
        let mut batch = PackedBatch::default();
        let mut seq = vec![5u8; tokens];
        seq[0] = alphabet::CLS;
        seq[tokens - 1] = alphabet::EOS;
        batch.push(
            SequenceMeta {
                index: 0,
                record: 0,
                id: "s".into(),
                residues: (tokens - 2) as u32,
            },
            &seq,
        );
        batch
    }

    #[test]
    fn ort_flavor_refuses_packs_over_the_rotary_grid_limit() {
        let at_limit = pack_of(ORT_FLAVOR_MAX_PACK_TOKENS);
        let over = pack_of(ORT_FLAVOR_MAX_PACK_TOKENS + 1);
        assert!(check_ort_flavor_pack(&at_limit, "ort").is_ok());
        let err = check_ort_flavor_pack(&over, "ort").expect_err("over the limit");
        assert!(err.to_string().contains("--toks-per-batch"), "{err}");
        assert!(check_ort_flavor_pack(&over, "virnuc").is_ok());
    }
}
