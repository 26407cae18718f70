"""The `virnuc` and `ort` flavors, and the float64 VarlenAttention oracle.

`virnuc`: the graph is run on ORT CPU with `com.virnuc:VarlenAttention` provided as a model-local ONNX
function whose body is the exporter's standard-ops attention — so the whole graph around the op (one
fused QKV MatMul, layout, attributes) is checked against HF; the op itself is checked against the float64
oracle, which is checked against HF's own rotary code.
`ort`: PackedMultiHeadAttention has only a CUDA kernel, so here: structure, onnx.checker, and the parts
that run on CPU (RotaryEmbedding, the token_offset derivation) numerically.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from transformers.models.esm.modeling_esm import RotaryEmbedding

from export_helpers import Model, cosine, pack, random_protein, residue_mean, run, session, token_rel_error
from virnuc_export.config import tokenize
from virnuc_export.graph import MS_DOMAIN, VIRNUC_DOMAIN, build_attention_model
from virnuc_export.varlen_reference import apply_rotary, varlen_attention


def random_pack(rng: np.random.Generator, lengths: list[int], nh: int, d: int) -> dict[str, np.ndarray]:
    total = sum(lengths)
    return {
        "qkv": rng.standard_normal((total, 3 * nh * d)).astype(np.float32),
        "cu_seqlens": np.cumsum([0, *lengths]).astype(np.int32),
        "position_ids": np.concatenate([np.arange(n) for n in lengths]).astype(np.int64),
    }


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# -- the oracle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 24, 32, 64, 128])
def test_varlen_reference_matches_masked_attention_graph(tmp_path, d: int):
    rng = np.random.default_rng(d)
    nh = 4
    path = tmp_path / "masked_attention.onnx"
    onnx.save(build_attention_model("masked", nh, d), path)
    sess = session(path)
    for lengths in ([1], [3, 1, 70], [130, 2, 2, 45, 9]):
        feeds = random_pack(rng, lengths, nh, d)
        got = run(sess, feeds)["out"]
        ref = varlen_attention(feeds["qkv"], feeds["cu_seqlens"], feeds["position_ids"], nh)
        assert rel_err(got, ref) <= 1e-5, (lengths, rel_err(got, ref))
        if len(lengths) > 1:  # the check sees a boundary leak or a missing rotary
            leak = varlen_attention(feeds["qkv"], np.array([0, sum(lengths)]), feeds["position_ids"], nh)
            assert rel_err(got, leak) > 1e-2
            no_rotary = varlen_attention(feeds["qkv"], feeds["cu_seqlens"], None, nh, rotary=0)
            assert rel_err(got, no_rotary) > 1e-2


def test_varlen_reference_matches_hf_rotary_attention_per_sequence():
    """Independent of the exporter: HF's RotaryEmbedding + softmax attention in float64, one sequence."""
    rng = np.random.default_rng(3)
    nh, d, n = 4, 32, 57
    feeds = random_pack(rng, [n], nh, d)
    ours = varlen_attention(feeds["qkv"], feeds["cu_seqlens"], feeds["position_ids"], nh)
    qkv = torch.from_numpy(feeds["qkv"]).double()
    q, k, v = (qkv[:, i * nh * d : (i + 1) * nh * d].view(n, nh, d).transpose(0, 1)[None] for i in range(3))
    q = q * d**-0.5
    q, k = RotaryEmbedding(d)(q, k)
    p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    hf = (p @ v)[0].transpose(0, 1).reshape(n, nh * d).numpy()
    assert rel_err(ours, hf) <= 1e-6


def test_varlen_reference_zero_length_sequences_and_errors():
    rng = np.random.default_rng(4)
    feeds = random_pack(rng, [5, 6], 2, 8)
    with_empty = varlen_attention(feeds["qkv"], np.array([0, 5, 5, 11]), feeds["position_ids"], 2)
    np.testing.assert_allclose(
        with_empty, varlen_attention(feeds["qkv"], feeds["cu_seqlens"], feeds["position_ids"], 2)
    )
    with pytest.raises(ValueError):
        varlen_attention(feeds["qkv"], np.array([0, 5, 10]), feeds["position_ids"], 2)


# -- virnuc flavor -------------------------------------------------------------------------------------


def varlen_as_local_function(nh: int, d: int, expected_attrs: dict, precision: str) -> onnx.FunctionProto:
    """com.virnuc:VarlenAttention as an ONNX function whose body is the standard-ops attention."""
    body = build_attention_model("masked", nh, d, precision).graph
    nodes = [
        helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in body.initializer
    ] + list(body.node)
    return helper.make_function(
        VIRNUC_DOMAIN, "VarlenAttention", ["qkv", "cu_seqlens", "position_ids"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)],
        attributes=sorted(expected_attrs),
    )  # fmt: skip


def test_virnuc_graph_structure(tiny: Model):
    model = onnx.load(tiny.export(attention="virnuc", fused=True))
    onnx.checker.check_model(model)
    cfg = tiny.source.config
    nh, h = cfg["num_heads"], cfg["hidden_size"]
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [
        ("input_ids", onnx.TensorProto.INT64), ("position_ids", onnx.TensorProto.INT64),
        ("cu_seqlens", onnx.TensorProto.INT32),
    ]  # fmt: skip
    assert {(o.domain, o.version) for o in model.opset_import} == {
        ("", 17),
        (MS_DOMAIN, 1),
        (VIRNUC_DOMAIN, 1),
    }
    va = [n for n in model.graph.node if n.op_type == "VarlenAttention"]
    assert len(va) == cfg["num_layers"] and all(n.domain == VIRNUC_DOMAIN for n in va)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in va:
        assert list(node.input)[1:] == ["cu_seqlens", "position_ids"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == nh and attrs["rotary"] == 1 and attrs["rotary_base"] == 10000.0
        assert attrs["scale"] == pytest.approx((h // nh) ** -0.5)
        add = producers[node.input[0]]  # qkv = MatMul(h, W_qkv [H, 3H]) + b_qkv [3H]: one fused projection
        assert add.op_type == "Add"
        matmul = producers[add.input[0]]
        assert matmul.op_type == "MatMul" and list(inits[matmul.input[1]].dims) == [h, 3 * h]
        assert list(inits[add.input[1]].dims) == [3 * h]
    ops = {n.op_type for n in model.graph.node}
    assert {"SkipLayerNormalization", "BiasGelu"} <= ops and "Gemm" not in ops


@pytest.mark.parametrize(
    ("fused", "precision"), [(False, "fp32"), (True, "fp32"), (True, "fp16")], ids=["plain", "fused", "fp16"]
)
def test_virnuc_graph_matches_hf_with_local_function_op(tiny: Model, tmp_path, fused: bool, precision: str):
    model = onnx.load(tiny.export(attention="virnuc", fused=fused, precision=precision))
    cfg = tiny.source.config
    nh, d = cfg["num_heads"], cfg["hidden_size"] // cfg["num_heads"]
    for node in model.graph.node:
        if node.op_type == "VarlenAttention":  # the function body hard-codes these values
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {
                "num_heads": nh,
                "scale": pytest.approx(d**-0.5),
                "rotary": 1,
                "rotary_base": 10000.0,
            }
    model.functions.append(varlen_as_local_function(nh, d, attrs, precision))
    path = tmp_path / "virnuc_with_function.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(31)
    tokens = [tokenize(random_protein(rng, n)) for n in (1, 5, 80, 200)]
    out = run(session(path), pack(tokens))
    cu = np.cumsum([0] + [len(t) for t in tokens])
    max_rel, min_cos = (1e-4, 0.99999) if precision == "fp32" else (2e-2, 0.999)
    for i, t in enumerate(tokens):
        ref = tiny.reference(t)
        assert token_rel_error(out["hidden"][cu[i] : cu[i + 1]], ref) <= max_rel
        assert cosine(out["mean"][i], residue_mean(ref)) >= min_cos


# -- ort flavor ----------------------------------------------------------------------------------------


def test_ort_graph_structure_and_cuda_only(tiny: Model):
    path = tiny.export(attention="ort", fused=True)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    cfg = tiny.source.config
    rot = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    pmha = [n for n in model.graph.node if n.op_type == "PackedMultiHeadAttention"]
    assert len(rot) == 2 * cfg["num_layers"] and len(pmha) == cfg["num_layers"]
    for n in rot:
        assert n.domain == MS_DOMAIN
        assert {a.name: helper.get_attribute_value(a) for a in n.attribute} == {"interleaved": 0}
    for n in pmha:
        assert n.domain == MS_DOMAIN and len(n.input) == 6 and n.input[3] == "" and n.input[5] == "cu_seqlens"
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["num_heads"] == cfg["num_heads"]
    # PackedMultiHeadAttention has no CPU kernel in ONNX Runtime: the flavor is for the CUDA EP.
    with pytest.raises(Exception, match="PackedMultiHeadAttention"):
        session(path)


def ort_parts_model(nh: int, d: int) -> onnx.ModelProto:
    """The ort attention model without PackedMultiHeadAttention: outputs rotated q, k and token_offset."""
    model = build_attention_model("ort", nh, d)
    graph = model.graph
    pmha = next(n for n in graph.node if n.op_type == "PackedMultiHeadAttention")
    q_rot, k_rot, _v, _, token_offset, _ = pmha.input
    keep = [n for n in graph.node if n.op_type not in ("PackedMultiHeadAttention", "Identity")]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(q_rot, onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info(k_rot, onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info(token_offset, onnx.TensorProto.INT32, None),
        ]
    )
    return model


def test_ort_rotary_and_token_offset_on_cpu(tmp_path):
    nh, d = 4, 32
    path = tmp_path / "ort_parts.onnx"
    onnx.save(ort_parts_model(nh, d), path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(8)
    # More packed tokens than cos/sin cache rows (1026): regression for ORT's RotaryEmbedding refusing
    # to "update" its cache when a pack was fed as one [1, T, H·D] sequence (seen on the CUDA EP).
    lengths = [3, 1, 7, 2, 700, 600]
    feeds = random_pack(rng, lengths, nh, d)
    assert feeds["position_ids"].shape[0] > 1026
    q_rot, k_rot, token_offset = sess.run(None, feeds)
    hd = nh * d
    q = feeds["qkv"][:, :hd].reshape(-1, nh, d).astype(np.float64)
    k = feeds["qkv"][:, hd : 2 * hd].reshape(-1, nh, d).astype(np.float64)
    pos = feeds["position_ids"]
    assert rel_err(q_rot, apply_rotary(q, pos).reshape(-1, hd)) <= 1e-5
    assert rel_err(k_rot, apply_rotary(k, pos).reshape(-1, hd)) <= 1e-5
    assert rel_err(q_rot, q.reshape(-1, hd)) > 1e-2  # rotary really applied
    # Padded layout [B, S=7]: real tokens' offsets b·S + s in packed order, then the padding offsets.
    s = max(lengths)
    real = [b * s + i for b, n in enumerate(lengths) for i in range(n)]
    pad = [b * s + i for b, n in enumerate(lengths) for i in range(n, s)]
    assert token_offset.shape == (len(lengths), s)
    assert token_offset.reshape(-1).tolist() == real + pad
