//! `com.virnuc:VarlenAttention` as an ONNX Runtime CPU custom operator (ort's `operator` API), one
//! registration per element type, all running [`crate::varlen::varlen_attention`].

use half::f16;
use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
    ShapeInferenceContext,
};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use crate::varlen::{Element, VarlenParams, varlen_attention};

/// The op's domain, type and contract version (`plugins/varlen_attention/README.md`). Version 2 adds
/// the optional `alibi_slopes` attribute; the domain's opset version stays 1.
pub const DOMAIN: &str = "com.virnuc";
pub const OP_TYPE: &str = "VarlenAttention";
pub const VERSION: &str = "2";

/// Creates the session of `builder` (which registers the `com.virnuc` domain) from `onnx`.
///
/// ONNX Runtime adds a custom domain to a process-wide schema map during session creation, and two
/// sessions doing so at the same moment can collide ("Trying to add a domain to DomainToVersion
/// map, but the domain is already exist"; seen in CI with parallel tests). Every such session is
/// therefore created under one lock ([`registering`]); it costs nothing in a run (one or two
/// sessions a process).
pub fn commit_session(
    mut builder: ort::session::builder::SessionBuilder,
    onnx: &std::path::Path,
) -> ort::Result<ort::session::Session> {
    registering(|| builder.commit_from_file(onnx))
}

/// Runs `create`, which creates a session registering the `com.virnuc` domain, under the lock that
/// [`commit_session`] takes (for sessions made another way, e.g. from an in-memory model).
pub fn registering<R>(create: impl FnOnce() -> R) -> R {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A panic while holding the lock leaves nothing half-done here: the map is ORT's.
    let _registering = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    create()
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
    // `get` cannot tell an absent attribute from one of another type, and ONNX Runtime reads a
    // single float or a list of ints as an empty list of floats: either would pass as "no ALiBi".
    let alibi_slopes = ctx
        .get::<Vec<f32>>("alibi_slopes")
        .filter(|s| !s.is_empty());
    if alibi_slopes.is_none()
        && (ctx.get::<f32>("alibi_slopes").is_some()
            || ctx.get::<i64>("alibi_slopes").is_some()
            || ctx
                .get::<Vec<i64>>("alibi_slopes")
                .is_some_and(|v| !v.is_empty()))
    {
        return Err(ort::Error::new(
            "VarlenAttention: attribute alibi_slopes must be a list of floats",
        ));
    }
    let params = VarlenParams {
        num_heads: num_heads as usize,
        scale: ctx.get::<f32>("scale"),
        rotary: ctx.get::<i64>("rotary").unwrap_or(1) != 0,
        rotary_base: ctx.get::<f32>("rotary_base").unwrap_or(10000.0),
        alibi_slopes,
    };
    // Attribute errors surface when the session is created, not at the first run.
    params.check().map_err(|e| ort::Error::new(e.to_string()))?;
    Ok(params)
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

#[cfg(test)]
mod tests {
    //! The attributes of a `VarlenAttention` node reach the op through ONNX Runtime: one-node
    //! graphs written by the venv's `onnx` package (`source tools/setup.sh`, as for every test
    //! of this crate that loads ONNX Runtime).
    use super::*;
    use ort::session::Session;
    use ort::value::Tensor;
    use std::path::{Path, PathBuf};

    const T: usize = 10;
    const H: usize = 2;
    const D: usize = 8;

    /// Writes a graph of one node with `attributes` (JSON: ints, floats, lists of floats, typed
    /// as `onnx.helper.make_node` types Python values) and returns its path.
    fn one_node_model(dir: &Path, attributes: &str) -> PathBuf {
        let path = dir.join("one_node.onnx");
        let script = r#"
import json, sys
import onnx
from onnx import TensorProto, helper
path, t, h, d, attributes = sys.argv[1], *map(int, sys.argv[2:5]), json.loads(sys.argv[5])
node = helper.make_node("VarlenAttention", ["qkv", "cu_seqlens"], ["out"], domain="com.virnuc", **attributes)
graph = helper.make_graph(
    [node], "one_node",
    [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [t, 3 * h * d]),
     helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, [3])],
    [helper.make_tensor_value_info("out", TensorProto.FLOAT, [t, h * d])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.virnuc", 1)])
model.ir_version = 8
onnx.save(model, path)
"#;
        let status = std::process::Command::new("python")
            .args(["-c", script])
            .arg(&path)
            .args([T, H, D].map(|x| x.to_string()))
            .arg(attributes)
            .status()
            .expect("python not found: `source tools/setup.sh` (the venv) first");
        assert!(status.success(), "writing a graph with {attributes} failed");
        path
    }

    fn session(attributes: &str) -> ort::Result<Session> {
        crate::runtime::init(None).expect("ONNX Runtime (source tools/setup.sh)");
        let env = crate::runtime::environment().expect("environment");
        let builder = Session::builder(env)?.with_operators(domain()?)?;
        let dir = tempfile::tempdir().expect("temp dir");
        commit_session(builder, &one_node_model(dir.path(), attributes))
    }

    fn inputs() -> (Vec<f32>, Vec<i32>) {
        let qkv = (0..T * 3 * H * D)
            .map(|i| ((i * 7919 % 263) as f32 / 263.0 - 0.5) * 3.0)
            .collect();
        (qkv, vec![0, 4, T as i32])
    }

    fn run(session: &mut Session) -> ort::Result<Vec<f32>> {
        let (qkv, cu) = inputs();
        let outputs = session.run(ort::inputs![
            "qkv" => Tensor::from_array(([T, 3 * H * D], qkv))?,
            "cu_seqlens" => Tensor::from_array(([3usize], cu))?,
        ])?;
        Ok(outputs["out"].try_extract_tensor::<f32>()?.1.to_vec())
    }

    fn direct(params: &VarlenParams) -> Vec<f32> {
        let (qkv, cu) = inputs();
        let mut out = vec![f32::NAN; T * H * D];
        varlen_attention(&qkv, &cu, None, params, &mut out).expect("valid");
        out
    }

    #[test]
    fn alibi_slopes_reach_the_op_through_onnx_runtime() {
        let attrs = r#"{"num_heads": 2, "rotary": 0, "alibi_slopes": [0.5, 0.125]}"#;
        let mut alibi = session(attrs).expect("ALiBi session");
        let got = run(&mut alibi).expect("run");
        assert_eq!(got, direct(&VarlenParams::alibi(vec![0.5, 0.125])));
        // The attribute changed the result: without it (rotary 0) the output differs.
        let mut plain = session(r#"{"num_heads": 2, "rotary": 0}"#).expect("session");
        let without = run(&mut plain).expect("run");
        assert_ne!(got, without);
        let plain_params = VarlenParams {
            rotary: false,
            ..VarlenParams::new(H)
        };
        assert_eq!(without, direct(&plain_params));
    }

    #[test]
    fn bad_alibi_attributes_fail_at_session_creation() {
        let cases = [
            // rotary defaults to 1: ALiBi graphs must say rotary = 0.
            (
                r#"{"num_heads": 2, "alibi_slopes": [0.5, 0.25]}"#,
                "rotary = 0",
            ),
            (
                r#"{"num_heads": 2, "rotary": 1, "alibi_slopes": [0.5, 0.25]}"#,
                "rotary = 0",
            ),
            (
                r#"{"num_heads": 2, "rotary": 0, "alibi_slopes": [0.5]}"#,
                "expected num_heads (2)",
            ),
            (
                r#"{"num_heads": 2, "rotary": 0, "alibi_slopes": 0.5}"#,
                "list of floats",
            ),
            (
                r#"{"num_heads": 2, "rotary": 0, "alibi_slopes": [1, 2]}"#,
                "list of floats",
            ),
        ];
        for (attributes, needle) in cases {
            let err = session(attributes)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains(needle),
                "{attributes}: {needle:?} not in {err:?}"
            );
        }
    }
}
