//! `com.virnuc:VarlenAttention` as an ONNX Runtime CPU custom operator (ort's `operator` API), one
//! registration per element type, all running [`crate::varlen::varlen_attention`].

use half::f16;
use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
    ShapeInferenceContext,
};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use crate::varlen::{Element, VarlenParams, varlen_attention};

/// The op's domain, type and version (`plugins/varlen_attention/README.md`).
pub const DOMAIN: &str = "com.virnuc";
pub const OP_TYPE: &str = "VarlenAttention";
pub const VERSION: &str = "1";

/// Creates the session of `builder` (which registers the `com.virnuc` domain) from `onnx`.
///
/// ONNX Runtime adds a custom domain to a process-wide schema map during session creation, and two
/// sessions doing so at the same moment can collide ("Trying to add a domain to DomainToVersion
/// map, but the domain is already exist"; seen in CI with parallel tests). Every such session is
/// therefore created here, one at a time; it costs nothing in a run (one or two sessions a process).
pub fn commit_session(
    mut builder: ort::session::builder::SessionBuilder,
    onnx: &std::path::Path,
) -> ort::Result<ort::session::Session> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A panic while holding the lock leaves nothing half-done here: the map is ORT's.
    let _registering = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    builder.commit_from_file(onnx)
}

/// The domain with the fp32 and fp16 kernels, ready for `SessionBuilder::with_operators`.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(VarlenAttentionOp::<f32>::new(TensorElementType::Float32))?
        .add(VarlenAttentionOp::<f16>::new(TensorElementType::Float16))
}

/// One element type of the op.
#[derive(Debug)]
pub struct VarlenAttentionOp<T> {
    ty: TensorElementType,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> VarlenAttentionOp<T> {
    fn new(ty: TensorElementType) -> Self {
        Self {
            ty,
            _t: std::marker::PhantomData,
        }
    }
}

/// Reads the attributes once, when ONNX Runtime creates the kernel for a node.
fn params_from(ctx: &KernelContext<'_>) -> ort::Result<VarlenParams> {
    let num_heads = ctx
        .get::<i64>("num_heads")
        .filter(|&h| h > 0)
        .ok_or_else(|| ort::Error::new("VarlenAttention: attribute num_heads (> 0) is required"))?;
    Ok(VarlenParams {
        num_heads: num_heads as usize,
        scale: ctx.get::<f32>("scale"),
        rotary: ctx.get::<i64>("rotary").unwrap_or(1) != 0,
        rotary_base: ctx.get::<f32>("rotary_base").unwrap_or(10000.0),
    })
}

/// The kernel of one node.
#[derive(Debug)]
pub struct VarlenKernel<T> {
    params: VarlenParams,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> Kernel for VarlenKernel<T>
where
    T: Element + ort::value::PrimitiveTensorElementType + std::fmt::Debug,
{
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let qkv = ctx
            .input(0)?
            .ok_or_else(|| ort::Error::new("VarlenAttention: missing qkv"))?;
        let cu = ctx
            .input(1)?
            .ok_or_else(|| ort::Error::new("VarlenAttention: missing cu_seqlens"))?;
        // The optional third input may be absent altogether or present but empty.
        let pos = if ctx.num_inputs()? > 2 {
            ctx.input(2)?
        } else {
            None
        };
        let (qkv_shape, qkv_data) = qkv.try_extract_tensor::<T>()?;
        if qkv_shape.len() != 2 || qkv_shape[1] % 3 != 0 {
            return Err(ort::Error::new(format!(
                "VarlenAttention: qkv must be [T, 3*H*D], got {qkv_shape:?}"
            )));
        }
        let (_, cu_data) = cu.try_extract_tensor::<i32>()?;
        let pos_data = match &pos {
            Some(p) => Some(p.try_extract_tensor::<i64>()?.1),
            None => None,
        };
        let rows = qkv_shape[0];
        let cols = qkv_shape[1] / 3;
        let mut out = ctx
            .output(0, vec![rows, cols])?
            .ok_or_else(|| ort::Error::new("VarlenAttention: cannot allocate output"))?;
        let (_, out_data) = out.try_extract_tensor_mut::<T>()?;
        varlen_attention(qkv_data, cu_data, pos_data, &self.params, out_data)
            .map_err(|e| ort::Error::new(e.to_string()))
    }
}

impl<T> Operator for VarlenAttentionOp<T>
where
    T: Element + ort::value::PrimitiveTensorElementType + std::fmt::Debug,
{
    type Kernel<'attr> = VarlenKernel<T>;

    fn name(&self) -> &str {
        OP_TYPE
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(self.ty),
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::optional(TensorElementType::Int64),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(self.ty)]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(VarlenKernel {
            params: params_from(ctx)?,
            _t: std::marker::PhantomData,
        })
    }

    /// `out` is `[T, qkv.shape[1] / 3]` of qkv's element type, so later nodes get typed shapes.
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        let Some(ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        }) = inputs.first()
        else {
            return Ok(());
        };
        if shape.len() != 2 {
            return Ok(());
        }
        let cols = if shape[1] >= 0 { shape[1] / 3 } else { -1 };
        let symbols: Vec<String> = vec![
            dimension_symbols.iter().next().cloned().unwrap_or_default(),
            String::new(),
        ];
        let out = ValueType::Tensor {
            ty: *ty,
            shape: Shape::new([shape[0], cols]),
            dimension_symbols: SymbolicDimensions::new(symbols),
        };
        ctx.set_output(0, &out)
    }
}
