"""The packed DNABERT-S graph (MosaicBERT as in MAGICS-LAB/DNABERT_S `bert_layers.py`), written node by
node on the machinery of `graph_base.py`.

Model: `LayerNorm(word_emb[ids] + token_type_emb[0])` (no position embeddings); per layer, post-LN:
`x1 = LN(dense(attn(Wqkv·x)) + x)` with ALiBi attention (`q·kᵀ·scale - slope_h·|i - j|` inside each
sequence), then the GeGLU MLP `x = LN(wo(gelu_erf(g[:, :F]) · g[:, F:]) + x1)`, `g = x1·gated_layersᵀ`
(no bias). No final LayerNorm. Pooling: the plain mean over every token of a sequence, `[CLS]`/`[SEP]`
included (VirNucPro's `torch.mean(hidden_states, dim=1)`).

Attention flavors: `masked` (standard ops: [heads, T, T] scores plus the ALiBi bias, block-diagonal,
built in the graph from `cu_seqlens`), `virnuc` (`com.virnuc:VarlenAttention`, ALiBi mode: `rotary = 0`,
`alibi_slopes`), `ort` (`PackedMultiHeadAttention` with an `attention_bias` [1, heads, S, S] — ALiBi
depends only on offsets inside a sequence, which the padded layout of that op shares for every sequence;
CUDA only).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph_base import (
    MASK_VALUE,
    MS_DOMAIN,
    VIRNUC_DOMAIN,
    Builder,
    ConfigOnly,
    GraphOptions,
    InitializerStore,
    PackedGraph,
    make_model,
)
from .weights import WeightSource

# Debug switches (GraphOptions.debug) for the tests that show the checks can fail; never in real exports.
DEBUG_SWITCHES: dict[str, str] = {
    "tanh_gelu": "GELU with the tanh approximation instead of erf",
    "geglu_swapped": "GeGLU halves swapped: gelu of the second half times the first",
    "slopes_reversed": "ALiBi slopes in reversed head order",
    "pool_without_specials": "mean without [CLS]/[SEP] (ESM-2's rule)",
    "pre_ln": "pre-LN blocks (x + f(LN(x))) instead of post-LN (LN(x + f(x)))",
    "query_positions_run_on": "ALiBi distance from a query's index in the pack (not restarting per sequence)"
    " to a key's offset in its sequence",
}


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes, float32. For a power of two n: 2^(-8(h+1)/n). Otherwise, with p the largest power of
    two below n: the p slopes of p heads, then the odd-numbered ones of 2p heads, 2^(-4(2k+1)/p), k < n - p
    (Press et al.'s rule as MosaicBERT's `_get_alibi_head_slopes` implements it)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads {num_heads} must be positive")
    p = 1 << (num_heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * (h + 1) / p) for h in range(p)]
    slopes += [2.0 ** (-4.0 * (2 * k + 1) / p) for k in range(num_heads - p)]
    return np.asarray(slopes, dtype=np.float32)


class DnabertGraph(PackedGraph):
    """The packed DNABERT-S graph."""

    pooling = "mean_all_tokens"

    def __init__(self, source: WeightSource, options: GraphOptions, store: InitializerStore) -> None:
        super().__init__(source, options, store)
        unknown = set(options.debug) - set(DEBUG_SWITCHES)
        if unknown:
            raise ValueError(f"unknown DNABERT-S debug switches {sorted(unknown)}")
        if options.skip_token_dropout_rescale:
            raise ValueError("skip_token_dropout_rescale is an ESM-2 switch")
        self.debug = frozenset(options.debug)
        if self.debug and options.fused:
            raise ValueError("debug switches apply to the standard-ops form (fused=False)")
        if "pool_without_specials" in self.debug:
            self.pooling = "mean_residues"
        self.slopes = alibi_slopes(self.nh)
        if "slopes_reversed" in self.debug:
            self.slopes = self.slopes[::-1].copy()
        self.ffn = int(self.cfg["ffn_size"])

    # -- building blocks -----------------------------------------------------------------------------
    def embeddings(self) -> str:
        # word_emb[ids] + token_type_emb[0]: the token-type row is added to the table once, in float32
        # (the same float32 sum the model computes per token), then LayerNorm.
        table = (
            self.p("embeddings.word_embeddings.weight") + self.p("embeddings.token_type_embeddings.weight")[0]
        )
        x = self.b.op("Gather", [self.weight("embed_tokens", table), "input_ids"], axis=0, name="embed")
        return self.layer_norm(x, "embeddings.LayerNorm", "embed_ln")

    def gelu_any(self, x: str) -> str:
        if "tanh_gelu" not in self.debug:
            if self.opt.fused:
                return self.b.op("Gelu", [x], domain=MS_DOMAIN, name="gelu")
            return self.gelu(x)
        b, c = self.b, lambda v: self.b.const(v, self.act)
        inner = b.op(
            "Mul",
            [
                b.op("Add", [x, b.op("Mul", [b.op("Pow", [x, c(3.0)]), c(0.044715)])]),
                c(math.sqrt(2 / math.pi)),
            ],
        )
        return b.op(
            "Mul", [b.op("Mul", [x, c(0.5)]), b.op("Add", [b.op("Tanh", [inner]), c(1.0)])], name="gelu_tanh"
        )

    def alibi_bias(self) -> str:
        """[heads, T, T] float32: -slope_h·|i - j| for tokens of one sequence, MASK_VALUE across sequences."""
        if "alibi_bias" in self._cache:
            return self._cache["alibi_bias"]
        b = self.b
        g = self.seq_geometry()
        tok = g["tok"]
        query_pos = tok  # token index in the pack: differences inside a sequence are offset differences
        key_pos = tok
        if "query_positions_run_on" in self.debug:
            key_pos = b.op("Sub", [tok, b.op("Gather", [g["starts"], g["seq_id"]], axis=0)])
        dist = b.op(
            "Cast",
            [
                b.op(
                    "Abs",
                    [
                        b.op(
                            "Sub",
                            [
                                b.op("Unsqueeze", [query_pos, b.i64(1)]),
                                b.op("Unsqueeze", [key_pos, b.i64(0)]),
                            ],
                        )
                    ],
                )
            ],
            to=TensorProto.FLOAT,
            name="alibi_dist",
        )  # [T, T]
        neg_slopes = b.const((-self.slopes).reshape(-1, 1, 1), np.float32)
        alibi = b.op("Mul", [neg_slopes, b.op("Unsqueeze", [dist, b.i64(0)])], name="alibi")  # [heads, T, T]
        seq_id = g["seq_id"]
        same = b.op("Equal", [b.op("Unsqueeze", [seq_id, b.i64(1)]), b.op("Unsqueeze", [seq_id, b.i64(0)])])
        bias = b.op("Where", [same, alibi, b.const(MASK_VALUE, np.float32)], name="alibi_bias")
        self._cache["alibi_bias"] = bias
        return bias

    def attention(self, qkv: str, layer: int) -> str:
        """qkv [T, 3H] (bias added) → context [T, H] before the output dense."""
        if self.opt.attention == "virnuc":
            return self.b.op(
                "VarlenAttention",
                [qkv, "cu_seqlens", "position_ids"],
                domain=VIRNUC_DOMAIN,
                num_heads=self.nh,
                scale=self.scale,
                rotary=0,
                alibi_slopes=[float(s) for s in self.slopes],
                name=f"l{layer}.attn",
            )
        if self.opt.attention == "ort":
            return self.ort_attention(qkv, layer)
        return masked_alibi_attention(self.b, qkv, self.nh, self.d, self.scale, self.act, self.alibi_bias())

    def qkv_columns(self, w: np.ndarray) -> np.ndarray:
        """Wqkv's output columns (its last axis) in the order the attention node reads them.

        The checkpoint's order is [q | k | v], each heads·head_dim. The `ort` flavor hands
        PackedMultiHeadAttention one packed tensor [T, heads, 3, head_dim] instead of three inputs,
        which saves a Split (a copy of the whole [T, 3H] activation a layer): its columns are
        reordered here, once, at export. The other flavors take [q | k | v] as is."""
        if self.opt.attention != "ort":
            return w
        lead = w.shape[:-1]
        return w.reshape(*lead, 3, self.nh, self.d).swapaxes(-3, -2).reshape(*lead, 3 * self.h)

    def ort_attention(self, qkv: str, layer: int) -> str:
        b = self.b
        packed = b.op("Reshape", [qkv, b.i64(0, self.nh, 3, self.d)], name=f"l{layer}.qkv_packed")
        token_offset, bias = self.ort_inputs()
        return b.op(
            "PackedMultiHeadAttention",
            [packed, "", "", "", token_offset, "cu_seqlens", bias],
            domain=MS_DOMAIN,
            num_heads=self.nh,
            scale=self.scale,
            name=f"l{layer}.attn",
        )

    def ort_inputs(self) -> tuple[str, str]:
        """token_offset [B, S] int32 (padded offsets b·S + s of the real tokens, then of the padding) and the
        ALiBi attention_bias [1, heads, S, S] (act dtype) of the padded layout, S = longest sequence."""
        if "token_offset" in self._cache:
            return self._cache["token_offset"], self._cache["ort_bias"]
        b = self.b
        token_offset, grid_s = self.padded_token_offset()
        grid_f = b.op("Cast", [grid_s], to=TensorProto.FLOAT)
        dist = b.op(
            "Abs",
            [b.op("Sub", [b.op("Unsqueeze", [grid_f, b.i64(1)]), b.op("Unsqueeze", [grid_f, b.i64(0)])])],
        )
        bias = b.op(
            "Mul",
            [
                b.const((-self.slopes).reshape(1, -1, 1, 1), np.float32),
                b.op("Unsqueeze", [dist, b.i64(0, 1)]),
            ],
        )
        if self.act is np.float16:
            bias = b.op("Cast", [bias], to=TensorProto.FLOAT16)
        bias = b.op("Identity", [bias], name="ort_alibi_bias")
        self._cache.update(token_offset=token_offset, ort_bias=bias)
        return token_offset, bias

    # -- the model -----------------------------------------------------------------------------------
    def build_layers(self) -> str:
        """Residual stream after `repr_layer` layers (0: the embeddings after their LayerNorm)."""
        b = self.b
        x = self.embeddings()
        for i in range(self.repr_layer):
            pre = f"encoder.layer.{i}"
            h = x
            if "pre_ln" in self.debug:
                h = self.layer_norm(x, f"{pre}.attention.output.LayerNorm", f"l{i}.ln_attn")
            qkv = b.op(
                "Add",
                [
                    b.op(
                        "MatMul",
                        [
                            h,
                            self.weight(
                                f"l{i}.qkv.w",
                                self.qkv_columns(self.linear_w(f"{pre}.attention.self.Wqkv.weight")),
                            ),
                        ],
                    ),
                    self.weight(f"l{i}.qkv.b", self.qkv_columns(self.p(f"{pre}.attention.self.Wqkv.bias"))),
                ],
            )
            ctx = self.attention(qkv, i)
            o = b.op(
                "MatMul",
                [ctx, self.weight(f"l{i}.out.w", self.linear_w(f"{pre}.attention.output.dense.weight"))],
            )
            x = self.residual_ln(
                o,
                x,
                f"{pre}.attention.output.dense.bias",
                f"{pre}.attention.output.LayerNorm",
                f"l{i}.ln_attn",
            )
            h = x
            if "pre_ln" in self.debug:
                h = self.layer_norm(x, f"{pre}.mlp.layernorm", f"l{i}.ln_mlp")
            # GeGLU: gated_layers is one [2·ffn, H] projection whose first half goes through GELU and
            # gates the second. Two MatMuls on the two halves of the weight give both halves
            # contiguous, where one MatMul and a Split of its [T, 2·ffn] output cost a copy of
            # the whole activation (18% of the graph's GPU time with the QKV split, on an H200).
            w = self.linear_w(f"{pre}.mlp.gated_layers.weight")  # [H, 2·ffn]
            halves = [w[:, : self.ffn], w[:, self.ffn :]]
            if "geglu_swapped" in self.debug:
                halves.reverse()
            gated = b.op("MatMul", [h, self.weight(f"l{i}.gate.w", halves[0])], name=f"l{i}.gate")
            non_gated = b.op("MatMul", [h, self.weight(f"l{i}.up.w", halves[1])], name=f"l{i}.up")
            act = b.op("Mul", [self.gelu_any(gated), non_gated], name=f"l{i}.geglu")
            o = b.op("MatMul", [act, self.weight(f"l{i}.wo.w", self.linear_w(f"{pre}.mlp.wo.weight"))])
            x = self.residual_ln(o, x, f"{pre}.mlp.wo.bias", f"{pre}.mlp.layernorm", f"l{i}.ln_mlp")
        return x

    def residual_ln(self, y: str, x: str, bias: str, ln: str, name: str) -> str:
        """Post-LN `LN(y + bias + x)` (fused: one SkipLayerNormalization); pre-LN debug: `x + y + bias`."""
        b = self.b
        if "pre_ln" in self.debug:
            return b.op(
                "Add", [x, b.op("Add", [y, self.weight(f"{name}.bias", self.p(bias))])], name=f"{name}.resid"
            )
        if self.opt.fused:
            out, _total = self.skip_ln(y, x, ln, bias, name)
            return out
        s = b.op("Add", [b.op("Add", [y, self.weight(f"{name}.bias", self.p(bias))]), x], name=f"{name}.sum")
        return self.layer_norm(s, ln, name)


def masked_alibi_attention(b: Builder, qkv: str, nh: int, d: int, scale: float, act: type, bias: str) -> str:
    """Standard-ops attention over a packed qkv [T, 3·nh·d] with an additive [nh, T, T] float32 bias (ALiBi
    and the block-diagonal mask); scores, bias and softmax in float32."""
    q, k, v = b.op("Split", [qkv], n_out=3, axis=1, name="qkv_split")
    per_head = b.i64(-1, nh, d)
    qh = b.op("Transpose", [b.op("Reshape", [q, per_head])], perm=[1, 0, 2])  # [nh, T, D]
    kh = b.op("Transpose", [b.op("Reshape", [k, per_head])], perm=[1, 2, 0])  # [nh, D, T]
    vh = b.op("Transpose", [b.op("Reshape", [v, per_head])], perm=[1, 0, 2])
    scores = b.op("MatMul", [qh, kh], name="scores")
    if act is np.float16:
        scores = b.op("Cast", [scores], to=TensorProto.FLOAT)
    scores = b.op("Mul", [scores, b.const(scale, np.float32)], name="scores_scaled")
    probs = b.op("Softmax", [b.op("Add", [scores, bias])], axis=-1, name="probs")
    if act is np.float16:
        probs = b.op("Cast", [probs], to=TensorProto.FLOAT16)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, vh])], perm=[1, 0, 2])  # [T, nh, D]
    return b.op("Reshape", [ctx, b.i64(-1, nh * d)], name="attn_out")


def build_alibi_attention_model(
    attention: str, num_heads: int, head_dim: int, precision: str = "fp32", slopes: np.ndarray | None = None
) -> onnx.ModelProto:
    """One ALiBi attention node of a flavor as a model: `qkv` [T, 3·H·D], `cu_seqlens` int32 [B+1],
    `position_ids` int64 [T] → `out` [T, H·D], exactly as the DNABERT-S graph computes it per layer (for
    testing VarlenAttention's ALiBi mode against the standard-ops form and the float64 oracle). `qkv`'s
    columns are [q | k | v], except in the `ort` flavor: [heads, 3, head_dim] (`DnabertGraph.qkv_columns`)."""
    hidden = num_heads * head_dim
    config = {"name": "alibi_attention_only", "family": "dnabert_s", "num_layers": 0, "hidden_size": hidden,
              "num_heads": num_heads, "ffn_size": 1, "layer_norm_eps": 1e-12}  # fmt: skip
    store = InitializerStore(None)
    g = DnabertGraph(
        ConfigOnly(config), GraphOptions(attention=attention, fused=False, precision=precision), store
    )
    if slopes is not None:
        g.slopes = np.asarray(slopes, dtype=np.float32)
    out = g.attention("qkv", 0)
    # (the exporter reorders Wqkv's columns for the ort flavor; a caller of this model does the same)
    g.b.nodes.append(helper.make_node("Identity", [out], ["out"], name="out_identity"))
    inputs = [
        helper.make_tensor_value_info("qkv", g.act_onnx, ["total_tokens", 3 * hidden]),
        helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["batch_plus_1"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["total_tokens"]),
    ]
    outputs = [helper.make_tensor_value_info("out", g.act_onnx, ["total_tokens", hidden])]
    graph = helper.make_graph(g.b.nodes, f"{attention}_alibi_attention", inputs, outputs, store.tensors)
    return make_model(graph, attention == "virnuc")
