//! `com.virnuc:VarlenAttention` as an ONNX Runtime custom op for the CUDA execution provider:
//! inputs and outputs stay in device memory and the kernel runs on the EP's compute stream.

use std::path::Path;
use std::sync::Arc;

use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::{DynTensorValueType, TensorElementType, ValueType};

use crate::CudaError;
use crate::driver::{DevicePointers, VarlenKernels, ensure_driver};
use crate::geometry::{Attributes, DType, Problem};

/// Custom-op domain of the contract (plugins/varlen_attention/README.md).
pub const DOMAIN: &str = "com.virnuc";
/// Op type of the contract.
pub const OP_TYPE: &str = "VarlenAttention";
/// ONNX Runtime's name of the CUDA execution provider.
pub const CUDA_EP: &str = "CUDAExecutionProvider";

/// The `com.virnuc` domain with `VarlenAttention` for float32, float16 and bfloat16 on the CUDA
/// EP, launching the kernel in `<kernel_dir>/varlen_attention.fatbin` (built by
/// `plugins/varlen_attention/build.sh`).
///
/// Fails now, with the reason, when the fatbin is missing or libcuda cannot be opened, rather
/// than at the first run. Register it on the session builder together with the CUDA EP; a session
/// that also needs the CPU op should use [`add_cuda_operators`] on its own `com.virnuc` domain.
pub fn cuda_operator_domain(kernel_dir: &Path) -> Result<OperatorDomain, CudaError> {
    // Artifacts and driver first: their errors need no ONNX Runtime library.
    let kernels = open_checked(kernel_dir)?;
    let domain = OperatorDomain::new(DOMAIN).map_err(|e| CudaError::Ort(e.to_string()))?;
    add_with(domain, &kernels)
}

/// Adds the three CUDA `VarlenAttention` operators to an existing `com.virnuc` domain, for a
/// session that also registers the CPU op: ONNX Runtime wants one domain object per domain name,
/// holding the kernels of every EP.
pub fn add_cuda_operators(
    domain: OperatorDomain,
    kernel_dir: &Path,
) -> Result<OperatorDomain, CudaError> {
    let kernels = open_checked(kernel_dir)?;
    add_with(domain, &kernels)
}

fn open_checked(kernel_dir: &Path) -> Result<Arc<VarlenKernels>, CudaError> {
    let kernels = Arc::new(VarlenKernels::open(kernel_dir)?);
    ensure_driver()?;
    Ok(kernels)
}

fn add_with(
    mut domain: OperatorDomain,
    kernels: &Arc<VarlenKernels>,
) -> Result<OperatorDomain, CudaError> {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        domain = domain
            .add(VarlenAttentionCuda {
                dtype,
                kernels: Arc::clone(kernels),
            })
            .map_err(|e| CudaError::Ort(e.to_string()))?;
    }
    Ok(domain)
}

/// One operator per element type (ONNX Runtime picks by the input types).
#[derive(Debug)]
pub struct VarlenAttentionCuda {
    dtype: DType,
    kernels: Arc<VarlenKernels>,
}

fn element_type(dtype: DType) -> TensorElementType {
    match dtype {
        DType::F32 => TensorElementType::Float32,
        DType::F16 => TensorElementType::Float16,
        DType::BF16 => TensorElementType::Bfloat16,
    }
}

impl Operator for VarlenAttentionCuda {
    type Kernel<'attr> = VarlenKernel;

    fn name(&self) -> &str {
        OP_TYPE
    }

    fn versions(&self) -> std::ops::RangeInclusive<u32> {
        1..=1
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some(CUDA_EP)
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(element_type(self.dtype)),
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::optional(TensorElementType::Int64),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(element_type(self.dtype))]
    }

    fn create_kernel<'attr>(
        &self,
        kctx: &KernelContext<'attr>,
    ) -> ort::Result<Self::Kernel<'attr>> {
        let defaults = Attributes::default();
        // As the CPU op: ONNX Runtime reads a single float or a list of ints as an empty float
        // list, which would pass as "no ALiBi".
        let alibi_slopes = kctx
            .get::<Vec<f32>>("alibi_slopes")
            .filter(|s| !s.is_empty());
        if alibi_slopes.is_none()
            && (kctx.get::<f32>("alibi_slopes").is_some()
                || kctx.get::<i64>("alibi_slopes").is_some()
                || kctx
                    .get::<Vec<i64>>("alibi_slopes")
                    .is_some_and(|v| !v.is_empty()))
        {
            return Err(ort::Error::new(
                "VarlenAttention: attribute alibi_slopes must be a list of floats",
            ));
        }
        let attrs = Attributes {
            num_heads: kctx.get::<i64>("num_heads").ok_or_else(|| {
                ort::Error::new("VarlenAttention: required attribute num_heads is missing")
            })?,
            scale: kctx.get::<f32>("scale"),
            rotary: kctx.get::<i64>("rotary").unwrap_or(defaults.rotary),
            rotary_base: kctx
                .get::<f32>("rotary_base")
                .unwrap_or(defaults.rotary_base),
            alibi_slopes: alibi_slopes.unwrap_or_default(),
        };
        // Attribute errors (rotary with ALiBi, slope count) when the session is created.
        attrs
            .alibi()
            .map_err(|e| ort::Error::new(format!("VarlenAttention: {e}")))?;
        let node = kctx.node_name().unwrap_or_default();
        Ok(VarlenKernel {
            attrs,
            dtype: self.dtype,
            kernels: Arc::clone(&self.kernels),
            node,
        })
    }
}

/// The kernel instance of one graph node.
#[derive(Debug)]
pub struct VarlenKernel {
    attrs: Attributes,
    dtype: DType,
    kernels: Arc<VarlenKernels>,
    node: String,
}

impl Kernel for VarlenKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        self.run(ctx)
            .map_err(|e| ort::Error::new(format!("VarlenAttention node {:?}: {e}", self.node)))
    }
}

fn shape_of(v: &ort::value::DynValue) -> Result<Vec<i64>, CudaError> {
    match v.dtype() {
        ValueType::Tensor { shape, .. } => Ok(shape.to_vec()),
        other => Err(CudaError::Invalid(format!(
            "expected a tensor, got {other:?}"
        ))),
    }
}

impl VarlenKernel {
    fn run(&self, ctx: &ComputeContext) -> Result<(), CudaError> {
        let ort = |e: ort::Error| CudaError::Ort(e.to_string());
        let missing = |what: &str| CudaError::Invalid(format!("input {what} is missing"));
        let qkv = ctx.input(0).map_err(ort)?.ok_or_else(|| missing("qkv"))?;
        let cu = ctx
            .input(1)
            .map_err(ort)?
            .ok_or_else(|| missing("cu_seqlens"))?;
        let pos = ctx.input(2).map_err(ort)?;
        let qkv_shape = shape_of(&qkv)?;
        let cu_shape = shape_of(&cu)?;
        let pos_shape = match &pos {
            Some(p) => Some(shape_of(p)?),
            None => None,
        };
        // An empty optional input arrives as a 0-element tensor: treat it as absent.
        let pos_shape =
            pos_shape.filter(|s| !(s.len() == 1 && s[0] == 0 && qkv_shape.first() != Some(&0)));
        let problem = Problem::validate(
            &self.attrs,
            self.dtype,
            &qkv_shape,
            &cu_shape,
            pos_shape.as_deref(),
        )?;

        let out_shape = vec![
            problem.total_tokens as i64,
            (problem.num_heads * problem.head_dim) as i64,
        ];
        let out = ctx
            .output(0, out_shape)
            .map_err(ort)?
            .ok_or_else(|| CudaError::Invalid("output 0 missing".into()))?;
        if problem.total_tokens == 0 || problem.batch == 0 {
            return Ok(());
        }
        let qkv_t = qkv.downcast::<DynTensorValueType>().map_err(ort)?;
        let cu_t = cu.downcast::<DynTensorValueType>().map_err(ort)?;
        let pos_ptr = match (problem.rotary, pos) {
            (true, Some(p)) => p.downcast::<DynTensorValueType>().map_err(ort)?.data_ptr() as u64,
            _ => 0,
        };
        // ValueRefMut gives no `&mut`; `data_ptr` reads the same (mutable) buffer address.
        let out_t = out.downcast::<DynTensorValueType>().map_err(ort)?;
        let ptrs = DevicePointers {
            qkv: qkv_t.data_ptr() as u64,
            cu_seqlens: cu_t.data_ptr() as u64,
            position_ids: pos_ptr,
            out: out_t.data_ptr() as u64,
        };
        let stream = ctx
            .stream()
            .map_err(ort)?
            .map_or(std::ptr::null_mut(), |s| s.as_ptr());
        // SAFETY: the operator declares the CUDA EP, so ONNX Runtime hands over device buffers of
        // the validated shapes (inputs) and a fresh one of `out_shape` (output), alive for this
        // call, and its compute stream of the current (primary) context.
        unsafe { self.kernels.launch(stream.cast(), &problem, &ptrs) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_without_kernels_fails_loudly_before_touching_onnx_runtime() {
        let dir = std::env::temp_dir().join("virnuc-cuda-domain-no-kernels");
        let err = cuda_operator_domain(&dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("bash plugins/varlen_attention/build.sh"),
            "{err}"
        );
    }

    #[test]
    fn domain_without_a_driver_says_so() {
        // With the fatbin built (tools/test.sh runs build.sh first) on a machine without the NVIDIA
        // driver (CI), the error names libcuda; with a driver this needs ONNX Runtime and is skipped.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/varlen_attention");
        if dir.join(crate::FATBIN_NAME).is_file() && ensure_driver().is_err() {
            let err = cuda_operator_domain(&dir)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("libcuda.so.1"), "{err}");
        }
    }
}
