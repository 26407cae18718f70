"""DNABERT-S `virnuc` and `ort` flavors, and the ALiBi mode of the float64 VarlenAttention oracle.

`virnuc`: the whole graph runs on ORT CPU with `com.virnuc:VarlenAttention` supplied as a model-local ONNX
function whose body is the exporter's standard-ops ALiBi attention; the op itself (the runtime's CPU op,
the CUDA kernel) is tested against the oracle by the runtime. `ort`: PackedMultiHeadAttention has only a
CUDA kernel — structure, onnx.checker and the parts that run on CPU (token_offset, the ALiBi bias).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from dnabert_helpers import MAX_REL, MIN_COS, Dnabert, compare, random_tokens
from export_helpers import session
from virnuc_export.graph import MS_DOMAIN, VIRNUC_DOMAIN
from virnuc_export.graph_base import ConfigOnly, GraphOptions, InitializerStore
from virnuc_export.graph_dnabert import DnabertGraph, alibi_slopes, build_alibi_attention_model
from virnuc_export.varlen_reference import varlen_attention


def random_pack(rng: np.random.Generator, lengths: list[int], nh: int, d: int) -> dict[str, np.ndarray]:
    return {
        "qkv": rng.standard_normal((sum(lengths), 3 * nh * d)).astype(np.float32),
        "cu_seqlens": np.cumsum([0, *lengths]).astype(np.int32),
        "position_ids": np.concatenate([np.arange(n) for n in lengths]).astype(np.int64),
    }


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# -- the oracle in ALiBi mode --------------------------------------------------------------------------


def test_alibi_oracle_matches_masked_attention_graph_and_sees_defects(tmp_path):
    nh, d = 12, 16
    slopes = alibi_slopes(nh)
    path = tmp_path / "alibi.onnx"
    onnx.save(build_alibi_attention_model("masked", nh, d), path)
    sess = session(path)
    rng = np.random.default_rng(1)
    for lengths in ([1], [3, 1, 70], [130, 2, 2, 45, 9]):
        feeds = random_pack(rng, lengths, nh, d)
        got = sess.run(["out"], feeds)[0]
        ref = varlen_attention(
            feeds["qkv"], feeds["cu_seqlens"], None, nh, 0.25, rotary=0, alibi_slopes=slopes
        )
        assert rel_err(got, ref) <= 1e-5, (lengths, rel_err(got, ref))
        if len(lengths) > 1:
            for wrong in (slopes[::-1], np.zeros(nh)):  # head order, no ALiBi
                bad = varlen_attention(
                    feeds["qkv"], feeds["cu_seqlens"], None, nh, 0.25, rotary=0, alibi_slopes=wrong
                )
                assert rel_err(got, bad) > 1e-3


def test_alibi_oracle_matches_torch_per_sequence():
    """Independent of the exporter: torch float64 softmax(q·kᵀ·scale + slopes·-|j - i|)·v, one sequence."""
    rng = np.random.default_rng(2)
    nh, d, n = 12, 32, 45
    feeds = random_pack(rng, [n], nh, d)
    slopes = alibi_slopes(nh)
    ours = varlen_attention(
        feeds["qkv"], feeds["cu_seqlens"], None, nh, d**-0.5, rotary=0, alibi_slopes=slopes
    )
    qkv = torch.from_numpy(feeds["qkv"]).double().view(n, 3, nh, d)
    q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))
    rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs()
    bias = torch.from_numpy(slopes).double()[:, None, None] * -rel
    p = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + bias, dim=-1)
    ref = (p @ v).transpose(0, 1).reshape(n, nh * d).numpy()
    assert rel_err(ours, ref) <= 1e-12


def test_alibi_oracle_refuses_rotary_and_wrong_slope_count():
    feeds = random_pack(np.random.default_rng(3), [4], 2, 8)
    with pytest.raises(ValueError, match="rotary"):
        varlen_attention(
            feeds["qkv"], feeds["cu_seqlens"], feeds["position_ids"], 2, alibi_slopes=[0.5, 0.25]
        )
    with pytest.raises(ValueError, match="alibi_slopes"):
        varlen_attention(feeds["qkv"], feeds["cu_seqlens"], None, 2, rotary=0, alibi_slopes=[0.5])


# -- virnuc flavor -------------------------------------------------------------------------------------


def alibi_varlen_as_local_function(nh: int, d: int, attrs: list[str], precision: str) -> onnx.FunctionProto:
    body = build_alibi_attention_model("masked", nh, d, precision).graph
    nodes = [
        helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in body.initializer
    ] + list(body.node)
    return helper.make_function(
        VIRNUC_DOMAIN, "VarlenAttention", ["qkv", "cu_seqlens", "position_ids"], ["out"], nodes,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)], attributes=attrs,
    )  # fmt: skip


def test_virnuc_graph_structure(dnabert: Dnabert):
    model = onnx.load(dnabert.export(attention="virnuc", fused=True))
    onnx.checker.check_model(model)
    cfg = dnabert.source.config
    h = cfg["hidden_size"]
    va = [n for n in model.graph.node if n.op_type == "VarlenAttention"]
    assert len(va) == cfg["num_layers"] and all(n.domain == VIRNUC_DOMAIN for n in va)
    assert {(o.domain, o.version) for o in model.opset_import} >= {(VIRNUC_DOMAIN, 1)}
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in va:
        assert list(node.input)[1:] == ["cu_seqlens", "position_ids"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert set(attrs) == {"num_heads", "scale", "rotary", "alibi_slopes"}
        assert attrs["num_heads"] == 12 and attrs["rotary"] == 0 and attrs["scale"] == 0.125
        assert np.array_equal(np.asarray(attrs["alibi_slopes"], dtype=np.float32), alibi_slopes(12))
        add = producers[node.input[0]]  # one fused Wqkv projection [768, 2304] + bias
        matmul = producers[add.input[0]]
        assert add.op_type == "Add" and matmul.op_type == "MatMul"
        assert list(inits[matmul.input[1]].dims) == [h, 3 * h] and list(inits[add.input[1]].dims) == [3 * h]
    ops = {n.op_type for n in model.graph.node}
    assert "SkipLayerNormalization" in ops and "Gemm" not in ops and "Softmax" not in ops


@pytest.mark.parametrize(("fused", "precision"), [(False, "fp32"), (True, "fp32"), (True, "fp16")])
def test_virnuc_graph_matches_reference_with_local_function_op(
    dnabert_tiny: Dnabert, tmp_path, fused, precision
):
    dnabert = dnabert_tiny  # 12 heads of 16: the same slopes, a fraction of the export time
    model = onnx.load(dnabert.export(attention="virnuc", fused=fused, precision=precision))
    model.functions.append(
        alibi_varlen_as_local_function(12, 16, ["alibi_slopes", "num_heads", "rotary", "scale"], precision)
    )
    path = tmp_path / "virnuc_with_function.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(44)
    seqs = [random_tokens(rng, n) for n in (1, 6, 90, 33)]
    err, cos = compare(dnabert, path, seqs)
    max_rel, min_cos = (MAX_REL, MIN_COS) if precision == "fp32" else (3e-2, 0.999)
    assert err <= max_rel and cos >= min_cos, (err, cos)


# -- ort flavor ----------------------------------------------------------------------------------------


def test_ort_graph_structure_and_cuda_only(dnabert_tiny: Dnabert):
    dnabert = dnabert_tiny
    path = dnabert.export(attention="ort", fused=True)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    pmha = [n for n in model.graph.node if n.op_type == "PackedMultiHeadAttention"]
    assert len(pmha) == dnabert.source.config["num_layers"]
    for n in pmha:
        assert n.domain == MS_DOMAIN and len(n.input) == 7
        assert n.input[3] == "" and n.input[5] == "cu_seqlens" and n.input[6] == "ort_alibi_bias"
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"num_heads": 12, "scale": 0.25}  # head_dim 16
    with pytest.raises(Exception, match="PackedMultiHeadAttention"):
        session(path)


@pytest.mark.parametrize("attention", ["ort", "virnuc", "masked"])
def test_qkv_columns_per_flavor(attention):
    """PackedMultiHeadAttention's packed input is [T, heads, 3, head_dim]: in the `ort` flavor the
    checkpoint's column m·H + n·D + j (m: q, k, v; n: head; j: lane) must land at n·3D + m·D + j, weight
    and bias alike; the other flavors take [q | k | v] unchanged."""
    nh, d = 4, 3
    hidden = nh * d
    config = {"name": "t", "family": "dnabert_s", "num_layers": 0, "hidden_size": hidden, "num_heads": nh,
              "ffn_size": 1, "layer_norm_eps": 1e-12}  # fmt: skip
    g = DnabertGraph(ConfigOnly(config), GraphOptions(attention=attention), InitializerStore(None))
    original = np.arange(3 * hidden, dtype=np.float64)
    weight = np.stack([original, -original])  # [in = 2, 3H]: each entry names its own column
    got_w, got_b = g.qkv_columns(weight), g.qkv_columns(original)
    if attention != "ort":
        np.testing.assert_array_equal(got_w, weight)
        np.testing.assert_array_equal(got_b, original)
        return
    for m in range(3):
        for n in range(nh):
            for j in range(d):
                assert got_b[n * 3 * d + m * d + j] == m * hidden + n * d + j
    np.testing.assert_array_equal(got_w, np.stack([got_b, -got_b]))


def test_ort_alibi_bias_and_token_offset_on_cpu(tmp_path):
    """The ort attention model up to PackedMultiHeadAttention: its bias is the ALiBi of the padded layout."""
    nh, d = 12, 16
    model = build_alibi_attention_model("ort", nh, d)
    graph = model.graph
    pmha = next(n for n in graph.node if n.op_type == "PackedMultiHeadAttention")
    token_offset, bias = pmha.input[4], pmha.input[6]
    keep = [n for n in graph.node if n.op_type not in ("PackedMultiHeadAttention", "Identity")] + [
        n for n in graph.node if n.op_type == "Identity" and n.output[0] == bias
    ]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(token_offset, onnx.TensorProto.INT32, None),
            helper.make_tensor_value_info(bias, onnx.TensorProto.FLOAT, None),
        ]
    )
    path = tmp_path / "ort_parts.onnx"
    onnx.save(model, path)
    lengths = [3, 1, 7, 2]
    feeds = random_pack(np.random.default_rng(9), lengths, nh, d)
    offsets, got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    s = max(lengths)
    real = [b * s + i for b, n in enumerate(lengths) for i in range(n)]
    pad = [b * s + i for b, n in enumerate(lengths) for i in range(n, s)]
    assert offsets.reshape(-1).tolist() == real + pad
    dist = np.abs(np.arange(s)[:, None] - np.arange(s)[None, :])
    np.testing.assert_array_equal(got, (-alibi_slopes(nh)[:, None, None] * dist)[None].astype(np.float32))
