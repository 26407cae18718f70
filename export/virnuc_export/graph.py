"""The packed ESM-2 graph, written node by node with the `onnx` helper API (shared machinery in
`graph_base.py`).

Inputs (every flavor): `input_ids` int64 [T], `position_ids` int64 [T], `cu_seqlens` int32 [B+1].
Everything an attention flavor needs besides (block-diagonal mask, PackedMultiHeadAttention's
token_offset, the pooling mask) is derived inside the graph from these three.
Outputs: `mean` float32 [B, H] and optionally `hidden` float32 [T, H].

Semantics follow HF transformers `EsmModel` / fair-esm `ESM2` (see ../shared/ARCHITECTURE.md):
token-dropout rescale, pre-LN layers, q·head_dim^-0.5, rotate_half rotary with per-sequence positions,
exact-erf GELU, `emb_layer_norm_after` on the last layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .config import MASK
from .graph_base import (
    FLAVORS,
    MASK_VALUE,
    MS_DOMAIN,
    OPSET,
    VIRNUC_DOMAIN,
    Builder,
    ConfigOnly,
    GraphOptions,
    InitializerStore,
    PackedGraph,
    block_diagonal_bias,
    make_model,
)

__all__ = [
    "FLAVORS",
    "MASK_VALUE",
    "MS_DOMAIN",
    "OPSET",
    "VIRNUC_DOMAIN",
    "EsmGraph",
    "GraphOptions",
    "InitializerStore",
    "block_diagonal_bias",
    "build_attention_model",
    "masked_attention",
]


class EsmGraph(PackedGraph):
    """The packed ESM-2 graph: pre-LN, rotary, mean over residues."""

    pooling = "mean_residues"

    def rotary_tables(self) -> tuple[str, str]:
        """cos, sin [T, 1, D] (act dtype) of rotate_half rotary at each token's position_ids."""
        if "cos" in self._cache:
            return self._cache["cos"], self._cache["sin"]
        b = self.b
        inv_freq = self.inv_freq()
        pos = b.op(
            "Unsqueeze", [b.op("Cast", ["position_ids"], to=TensorProto.FLOAT), b.i64(1)], name="pos_f"
        )
        angle = b.op("Mul", [pos, b.const(inv_freq[None, :], np.float32)], name="rot_angle")  # [T, D/2]
        emb = b.op("Concat", [angle, angle], axis=1, name="rot_emb")
        cos = b.op("Unsqueeze", [b.op("Cos", [emb], name="rot_cos32"), b.i64(1)], name="rot_cos3")
        sin = b.op("Unsqueeze", [b.op("Sin", [emb], name="rot_sin32"), b.i64(1)], name="rot_sin3")
        if self.act is np.float16:
            cos = b.op("Cast", [cos], to=self.act_onnx, name="rot_cos16")
            sin = b.op("Cast", [sin], to=self.act_onnx, name="rot_sin16")
        self._cache.update(cos=cos, sin=sin)
        return cos, sin

    def inv_freq(self) -> np.ndarray:
        # As HF/fair-esm: 1 / base^(arange(0, D, 2) / D) in float32.
        exponent = np.arange(0, self.d, 2, dtype=np.int64).astype(np.float32) / np.float32(self.d)
        return (1.0 / (np.float32(self.cfg["rotary_base"]) ** exponent)).astype(np.float32)

    def embeddings(self) -> str:
        b = self.b
        table = self.weight("embed_tokens", self.p("embeddings.word_embeddings.weight"))
        x = b.op("Gather", [table, "input_ids"], axis=0, name="embed")
        scale = float(self.cfg["token_dropout_scale"])
        if scale == 1.0 or self.opt.skip_token_dropout_rescale:
            return x
        # HF EsmEmbeddings / fair-esm token dropout at inference: <mask> embeddings zeroed, then every token
        # of a sequence scaled by scale / (1 - mask_count / seq_len) (= scale without <mask> tokens).
        g = self.seq_geometry()
        is_mask = b.op("Equal", ["input_ids", b.const(MASK, np.int64)], name="is_mask")
        x = b.op(
            "Where", [b.op("Unsqueeze", [is_mask, b.i64(1)]), b.const(0.0, self.act), x], name="embed_masked"
        )
        in_seq = b.op(
            "And",
            [
                b.op("GreaterOrEqual", [g["tok_row"], g["starts_col"]]),
                b.op("Less", [g["tok_row"], g["ends_col"]]),
            ],
        )
        masks_per_seq = b.op(
            "ReduceSum",
            [
                b.op(
                    "Cast",
                    [b.op("And", [in_seq, b.op("Unsqueeze", [is_mask, b.i64(0)])])],
                    to=TensorProto.FLOAT,
                ),
                b.i64(1),
            ],
            keepdims=0,
            name="mask_count",
        )
        lens_f = b.op("Cast", [g["lens"]], to=TensorProto.FLOAT)
        ratio = b.op(
            "Div", [masks_per_seq, b.op("Max", [lens_f, b.const(1.0, np.float32)])], name="mask_ratio"
        )
        factor = b.op("Div", [b.const(scale, np.float32), b.op("Sub", [b.const(1.0, np.float32), ratio])])
        per_token = b.op(
            "Unsqueeze", [b.op("Gather", [factor, g["seq_id"]], axis=0), b.i64(1)], name="td_factor"
        )
        if self.act is np.float16:
            per_token = b.op("Cast", [per_token], to=self.act_onnx)
        return b.op("Mul", [x, per_token], name="embed_scaled")

    # -- attention flavors ---------------------------------------------------------------------------
    def attention(self, qkv: str, layer: int) -> str:
        """qkv [T, 3H] (biases added, q not scaled) → attention output [T, H] before out_proj."""
        if self.opt.attention == "virnuc":
            return self.b.op(
                "VarlenAttention",
                [qkv, "cu_seqlens", "position_ids"],
                domain=VIRNUC_DOMAIN,
                num_heads=self.nh,
                scale=self.scale,
                rotary=1,
                rotary_base=float(self.cfg["rotary_base"]),
                name=f"l{layer}.attn",
            )
        if self.opt.attention == "ort":
            return self.ort_attention(qkv, layer)
        return masked_attention(
            self.b, qkv, self.nh, self.d, self.scale, self.act, self.rotary_tables(), self.block_bias()
        )

    def ort_attention(self, qkv: str, layer: int) -> str:
        b = self.b
        q, k, v = b.op(
            "Split", [qkv, b.i64(self.h, self.h, self.h)], n_out=3, axis=1, name=f"l{layer}.qkv_split"
        )
        cos_cache, sin_cache, pos2d, token_offset = self.ort_inputs()
        rotated = []
        for part, x in (("q", q), ("k", k)):
            # [T, 1, H·D] with positions [T, 1]: each token is its own "batch" row, so ORT's check
            # sequence_length <= cos_cache rows holds for any pack size (the CUDA kernel refuses to
            # "update" the cache when a [1, T, H·D] pack is longer than max_positions).
            x3 = b.op("Unsqueeze", [x, b.i64(1)], name=f"l{layer}.{part}3")
            r = b.op(
                "RotaryEmbedding",
                [x3, pos2d, cos_cache, sin_cache],
                domain=MS_DOMAIN,
                interleaved=0,
                name=f"l{layer}.rotary_{part}",
            )
            rotated.append(b.op("Squeeze", [r, b.i64(1)], name=f"l{layer}.{part}_rot"))
        return b.op(
            "PackedMultiHeadAttention",
            [rotated[0], rotated[1], v, "", token_offset, "cu_seqlens"],
            domain=MS_DOMAIN,
            num_heads=self.nh,
            scale=self.scale,
            name=f"l{layer}.attn",
        )

    def ort_inputs(self) -> tuple[str, str, str, str]:
        """cos/sin caches [max_positions, D/2], position_ids as [T, 1], token_offset [B, S] int32."""
        if "token_offset" in self._cache:
            c = self._cache
            return c["cos_cache"], c["sin_cache"], c["pos2d"], c["token_offset"]
        b = self.b
        positions = np.arange(self.cfg["max_positions"], dtype=np.float32)
        angle = np.outer(positions, self.inv_freq()).astype(np.float32)
        cos_cache = b.const(np.cos(angle).astype(self.act), self.act)
        sin_cache = b.const(np.sin(angle).astype(self.act), self.act)
        pos2d = b.op("Unsqueeze", ["position_ids", b.i64(1)], name="pos2d")  # [T, 1]
        token_offset, _ = self.padded_token_offset()
        self._cache.update(cos_cache=cos_cache, sin_cache=sin_cache, pos2d=pos2d, token_offset=token_offset)
        return cos_cache, sin_cache, pos2d, token_offset

    # -- the model -----------------------------------------------------------------------------------
    def qkv_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        pre = f"encoder.layer.{layer}.attention.self"
        w = np.concatenate([self.linear_w(f"{pre}.{n}.weight") for n in ("query", "key", "value")], axis=1)
        bias = np.concatenate([self.p(f"{pre}.{n}.bias") for n in ("query", "key", "value")])
        return w, bias

    def build_layers(self) -> str:
        """Residual stream after `repr_layer` layers (final layer norm applied when it is the last)."""
        b = self.b
        x = self.embeddings()
        n = self.repr_layer
        last = self.cfg["num_layers"]
        if n == 0:
            return x
        if not self.opt.fused:
            for i in range(n):
                pre = f"encoder.layer.{i}"
                h = self.layer_norm(x, f"{pre}.attention.LayerNorm", f"l{i}.ln_attn")
                w, bias = self.qkv_weights(i)
                qkv = b.op(
                    "Add",
                    [b.op("MatMul", [h, self.weight(f"l{i}.qkv.w", w)]), self.weight(f"l{i}.qkv.b", bias)],
                )
                a = self.attention(qkv, i)
                o = b.op(
                    "MatMul",
                    [a, self.weight(f"l{i}.out.w", self.linear_w(f"{pre}.attention.output.dense.weight"))],
                )
                o = b.op("Add", [o, self.weight(f"l{i}.out.b", self.p(f"{pre}.attention.output.dense.bias"))])
                x = b.op("Add", [x, o], name=f"l{i}.resid_attn")
                h = self.layer_norm(x, f"{pre}.LayerNorm", f"l{i}.ln_ffn")
                f = b.op(
                    "MatMul",
                    [h, self.weight(f"l{i}.fc1.w", self.linear_w(f"{pre}.intermediate.dense.weight"))],
                )
                f = self.gelu(
                    b.op("Add", [f, self.weight(f"l{i}.fc1.b", self.p(f"{pre}.intermediate.dense.bias"))])
                )
                o = b.op(
                    "MatMul", [f, self.weight(f"l{i}.fc2.w", self.linear_w(f"{pre}.output.dense.weight"))]
                )
                o = b.op("Add", [o, self.weight(f"l{i}.fc2.b", self.p(f"{pre}.output.dense.bias"))])
                x = b.op("Add", [x, o], name=f"l{i}.resid_ffn")
            if n == last:
                x = self.layer_norm(x, "encoder.emb_layer_norm_after", "final_ln")
            return x
        # Fused form: residual add + bias + layer norm as one SkipLayerNormalization; bias + GELU as BiasGelu.
        h = self.layer_norm(x, "encoder.layer.0.attention.LayerNorm", "l0.ln_attn")
        for i in range(n):
            pre = f"encoder.layer.{i}"
            w, bias = self.qkv_weights(i)
            qkv = b.op(
                "Add", [b.op("MatMul", [h, self.weight(f"l{i}.qkv.w", w)]), self.weight(f"l{i}.qkv.b", bias)]
            )
            a = self.attention(qkv, i)
            o = b.op(
                "MatMul",
                [a, self.weight(f"l{i}.out.w", self.linear_w(f"{pre}.attention.output.dense.weight"))],
            )
            h, x = self.skip_ln(
                o, x, f"{pre}.LayerNorm", f"{pre}.attention.output.dense.bias", f"l{i}.skipln_ffn"
            )
            f = b.op(
                "MatMul", [h, self.weight(f"l{i}.fc1.w", self.linear_w(f"{pre}.intermediate.dense.weight"))]
            )
            f = b.op(
                "BiasGelu",
                [f, self.weight(f"l{i}.fc1.b", self.p(f"{pre}.intermediate.dense.bias"))],
                domain=MS_DOMAIN,
            )
            o = b.op("MatMul", [f, self.weight(f"l{i}.fc2.w", self.linear_w(f"{pre}.output.dense.weight"))])
            fc2_bias = f"{pre}.output.dense.bias"
            if i + 1 < n:
                h, x = self.skip_ln(
                    o, x, f"encoder.layer.{i + 1}.attention.LayerNorm", fc2_bias, f"l{i + 1}.skipln_attn"
                )
            elif n == last:
                h, x = self.skip_ln(o, x, "encoder.emb_layer_norm_after", fc2_bias, "final_ln")
                return h
            else:
                o = b.op("Add", [o, self.weight(f"l{i}.fc2.b", self.p(fc2_bias))])
                return b.op("Add", [x, o], name=f"l{i}.resid_ffn")
        raise AssertionError("unreachable")


def rotate_half_apply(b: Builder, x: str, cos: str, sin: str, d: int) -> str:
    """x·cos + rotate_half(x)·sin for x [T, heads, D]; rotate_half(x) = concat(-x2, x1)."""
    x1, x2 = b.op("Split", [x, b.i64(d // 2, d // 2)], n_out=2, axis=-1)
    rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])], name="rotary")


def masked_attention(
    b: Builder, qkv: str, nh: int, d: int, scale: float, act: Any, rotary: tuple[str, str], bias: str
) -> str:
    """Standard-ops attention over a packed qkv [T, 3·nh·d] with a block-diagonal bias; softmax in float32.

    Order as HF EsmSelfAttention: q scaled by `scale`, then rotary on q and k.
    """
    q, k, v = b.op("Split", [qkv], n_out=3, axis=1, name="qkv_split")
    cos, sin = rotary
    q = b.op("Mul", [q, b.const(scale, act)], name="q_scaled")
    per_head = b.i64(-1, nh, d)
    q3 = rotate_half_apply(b, b.op("Reshape", [q, per_head]), cos, sin, d)
    k3 = rotate_half_apply(b, b.op("Reshape", [k, per_head]), cos, sin, d)
    v3 = b.op("Reshape", [v, per_head])
    qh = b.op("Transpose", [q3], perm=[1, 0, 2])  # [nh, T, D]
    kh = b.op("Transpose", [k3], perm=[1, 2, 0])  # [nh, D, T]
    vh = b.op("Transpose", [v3], perm=[1, 0, 2])
    scores = b.op("MatMul", [qh, kh], name="scores")
    if act is np.float16:
        scores = b.op("Cast", [scores], to=TensorProto.FLOAT)
    probs = b.op("Softmax", [b.op("Add", [scores, bias])], axis=-1, name="probs")
    if act is np.float16:
        probs = b.op("Cast", [probs], to=TensorProto.FLOAT16)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, vh])], perm=[1, 0, 2])  # [T, nh, D]
    return b.op("Reshape", [ctx, b.i64(-1, nh * d)], name="attn_out")


def build_attention_model(
    attention: str, num_heads: int, head_dim: int, precision: str = "fp32", rotary_base: float = 10000.0
) -> onnx.ModelProto:
    """One attention node of a flavor as a model: inputs `qkv` [T, 3·H·D] (biases added, q not scaled),
    `cu_seqlens` int32 [B+1], `position_ids` int64 [T]; output `out` [T, H·D] — exactly what the full
    graph computes per layer. For testing op implementations against each other at the attention level
    (VarlenAttention vs the standard-ops form vs the float64 oracle)."""
    hidden = num_heads * head_dim
    config = {
        "name": "attention_only", "num_layers": 0, "hidden_size": hidden, "num_heads": num_heads,
        "layer_norm_eps": 1e-5, "rotary_base": rotary_base, "max_positions": 1026, "token_dropout_scale": 1.0,
    }  # fmt: skip
    store = InitializerStore(None)
    g = EsmGraph(ConfigOnly(config), GraphOptions(attention=attention, precision=precision), store)
    out = g.attention("qkv", 0)
    g.b.nodes.append(helper.make_node("Identity", [out], ["out"], name="out_identity"))
    inputs = [
        helper.make_tensor_value_info("qkv", g.act_onnx, ["total_tokens", 3 * hidden]),
        helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["batch_plus_1"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["total_tokens"]),
    ]
    outputs = [helper.make_tensor_value_info("out", g.act_onnx, ["total_tokens", hidden])]
    graph = helper.make_graph(g.b.nodes, f"{attention}_attention", inputs, outputs, store.tensors)
    model = make_model(graph, attention == "virnuc")
    return model
