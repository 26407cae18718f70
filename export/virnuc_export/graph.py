"""The packed ESM-2 graph, written node by node with the `onnx` helper API.

Inputs (every flavor): `input_ids` int64 [T], `position_ids` int64 [T], `cu_seqlens` int32 [B+1].
Everything an attention flavor needs besides (block-diagonal mask, PackedMultiHeadAttention's
token_offset, the pooling mask) is derived inside the graph from these three.
Outputs: `mean` float32 [B, H] and optionally `hidden` float32 [T, H].

Semantics follow HF transformers `EsmModel` / fair-esm `ESM2` (see ../shared/ARCHITECTURE.md):
token-dropout rescale, pre-LN layers, q·head_dim^-0.5, rotate_half rotary with per-sequence positions,
exact-erf GELU, `emb_layer_norm_after` on the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import MASK
from .weights import WeightSource

OPSET = 17
MS_DOMAIN = "com.microsoft"
VIRNUC_DOMAIN = "com.virnuc"
FLAVORS = ("virnuc", "ort", "masked")
# Additive attention bias between tokens of different sequences (masked flavor). Finite, so that no
# runtime sees inf - inf; exp(-1e9) is exactly 0 in float32.
MASK_VALUE = -1.0e9


@dataclass(frozen=True)
class GraphOptions:
    attention: str = "virnuc"
    fused: bool = True
    precision: str = "fp32"
    per_token: bool = False
    repr_layer: int | None = None  # None: last layer
    # Debug switch for the tests that show the checks can fail; never set in real exports.
    skip_token_dropout_rescale: bool = False

    def validate(self, num_layers: int) -> None:
        if self.attention not in FLAVORS:
            raise ValueError(f"attention must be one of {FLAVORS}, not {self.attention!r}")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, not {self.precision!r}")
        if self.repr_layer is not None and not 0 <= self.repr_layer <= num_layers:
            raise ValueError(f"repr_layer {self.repr_layer} outside 0..{num_layers}")


class InitializerStore:
    """Initializers, embedded in the model or streamed to one external data file as they come."""

    def __init__(self, data_path: Path | None) -> None:
        self.data_path = data_path
        self._file: BinaryIO | None = data_path.open("wb") if data_path else None
        self.tensors: list[TensorProto] = []
        self.bytes_written = 0

    def add(self, name: str, array: np.ndarray, embed: bool = False) -> str:
        array = np.ascontiguousarray(array)
        if self._file is None or embed or array.nbytes < 1024:
            self.tensors.append(numpy_helper.from_array(array, name))
            return name
        pad = (-self.bytes_written) % 64  # aligned offsets let runtimes memory-map tensors
        if pad:
            self._file.write(b"\0" * pad)
            self.bytes_written += pad
        offset = self.bytes_written
        array.tofile(self._file)
        self.bytes_written += array.nbytes
        t = TensorProto()
        t.name = name
        t.dims.extend(array.shape)
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.data_location = TensorProto.EXTERNAL
        assert self.data_path is not None
        for key, value in (("location", self.data_path.name), ("offset", offset), ("length", array.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.tensors.append(t)
        return name

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Builder:
    """Node list with unique names; `op` returns the output name(s)."""

    def __init__(self, store: InitializerStore) -> None:
        self.store = store
        self.nodes: list[onnx.NodeProto] = []
        self._count: dict[str, int] = {}
        self._consts: dict[tuple[Any, ...], str] = {}

    def fresh(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return f"{hint}_{n}" if n else hint

    def op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int = 1,
        domain: str = "",
        name: str | None = None,
        **attrs: Any,
    ) -> Any:
        base = self.fresh(name or op_type.lower())
        outs = [base if i == 0 else f"{base}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: Any) -> str:
        """A small constant initializer, shared between uses."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.store.add(self.fresh("const"), arr, embed=True)
        return self._consts[key]

    def i64(self, *values: int) -> str:
        return self.const(list(values), np.int64)


class EsmGraph:
    """Writes the packed graph for one weight source and set of options."""

    def __init__(self, source: WeightSource, options: GraphOptions, store: InitializerStore) -> None:
        self.src = source
        self.cfg = source.config
        self.opt = options
        self.b = Builder(store)
        self.store = store
        self.act = np.float16 if options.precision == "fp16" else np.float32
        self.act_onnx = TensorProto.FLOAT16 if options.precision == "fp16" else TensorProto.FLOAT
        self.h = self.cfg["hidden_size"]
        self.nh = self.cfg["num_heads"]
        self.d = self.h // self.nh
        self.eps = float(self.cfg["layer_norm_eps"])
        self.scale = self.d**-0.5
        self.repr_layer = self.cfg["num_layers"] if options.repr_layer is None else options.repr_layer
        self._cache: dict[str, str] = {}

    # -- weights -------------------------------------------------------------------------------------
    def weight(self, graph_name: str, array: np.ndarray) -> str:
        # One pass converts the dtype and, for transposed views, lays the result out row-major.
        return self.store.add(graph_name, array.astype(self.act, order="C", copy=False))

    def p(self, name: str) -> np.ndarray:
        return self.src.get(name)

    def linear_w(self, name: str) -> np.ndarray:
        """torch Linear weight [out, in] → MatMul right operand [in, out] (a view; `weight` copies)."""
        return self.p(name).T

    # -- shared derived tensors ----------------------------------------------------------------------
    def seq_geometry(self) -> dict[str, str]:
        """Token index, sequence starts/ends/lengths and each token's sequence index, from cu_seqlens."""
        if "tok" in self._cache:
            return self._cache
        b = self.b
        cu = b.op("Cast", ["cu_seqlens"], to=TensorProto.INT64, name="cu64")
        starts = b.op("Slice", [cu, b.i64(0), b.i64(-1)], name="seq_starts")
        ends = b.op("Slice", [cu, b.i64(1), b.i64(2**62)], name="seq_ends")
        lens = b.op("Sub", [ends, starts], name="seq_lens")
        t_scalar = b.op(
            "Squeeze", [b.op("Shape", ["position_ids"], name="t_shape"), b.i64(0)], name="t_scalar"
        )
        tok = b.op("Range", [b.const(0, np.int64), t_scalar, b.const(1, np.int64)], name="tok_index")
        tok_row = b.op("Unsqueeze", [tok, b.i64(0)], name="tok_row")  # [1, T]
        starts_col = b.op("Unsqueeze", [starts, b.i64(1)], name="starts_col")  # [B, 1]
        ends_col = b.op("Unsqueeze", [ends, b.i64(1)], name="ends_col")
        # seq_id[t] = number of sequences that end at or before t.
        ended = b.op("Cast", [b.op("LessOrEqual", [ends_col, tok_row])], to=TensorProto.INT64)
        seq_id = b.op("ReduceSum", [ended, b.i64(0)], keepdims=0, name="seq_id")
        self._cache.update(
            cu=cu,
            starts=starts,
            ends=ends,
            lens=lens,
            tok=tok,
            tok_row=tok_row,
            starts_col=starts_col,
            ends_col=ends_col,
            seq_id=seq_id,
        )
        return self._cache

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

    # -- building blocks -----------------------------------------------------------------------------
    def layer_norm(self, x: str, prefix: str, name: str) -> str:
        g = self.weight(f"{name}.gamma", self.p(f"{prefix}.weight"))
        beta = self.weight(f"{name}.beta", self.p(f"{prefix}.bias"))
        # stash_type=1: mean and variance in float32 also for float16 inputs.
        return self.b.op(
            "LayerNormalization", [x, g, beta], axis=-1, epsilon=self.eps, stash_type=1, name=name
        )

    def gelu(self, x: str) -> str:
        """Exact-erf GELU, x · 0.5 · (1 + erf(x / √2)), in standard ops."""
        b, c = self.b, lambda v: self.b.const(v, self.act)
        erf = b.op("Erf", [b.op("Mul", [x, c(1.0 / math.sqrt(2.0))])], name="gelu_erf")
        return b.op("Mul", [b.op("Mul", [x, c(0.5)]), b.op("Add", [erf, c(1.0)])], name="gelu")

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

    def block_bias(self) -> str:
        if "block_bias" not in self._cache:
            self._cache["block_bias"] = block_diagonal_bias(self.b, self.seq_geometry()["seq_id"])
        return self._cache["block_bias"]

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
        g = self.seq_geometry()
        # token_offset (PackedMultiHeadAttention): flattened [B, S] padded positions b·S + s, those of the
        # real tokens first (in packed order), then the padding positions.
        lens = g["lens"]
        s_max = b.op("ReduceMax", [lens], keepdims=1, name="max_seqlen")  # [1]
        n_seq = b.op("Shape", [lens], name="n_seq")  # [1]
        grid_s = b.op(
            "Range", [b.const(0, np.int64), b.op("Squeeze", [s_max, b.i64(0)]), b.const(1, np.int64)]
        )
        grid_b = b.op(
            "Range", [b.const(0, np.int64), b.op("Squeeze", [n_seq, b.i64(0)]), b.const(1, np.int64)]
        )
        offsets = b.op(
            "Add",
            [
                b.op("Mul", [b.op("Unsqueeze", [grid_b, b.i64(1)]), s_max]),
                b.op("Unsqueeze", [grid_s, b.i64(0)]),
            ],
        )
        valid = b.op("Less", [b.op("Unsqueeze", [grid_s, b.i64(0)]), b.op("Unsqueeze", [lens, b.i64(1)])])
        flat_off = b.op("Reshape", [offsets, b.i64(-1)])
        flat_valid = b.op("Reshape", [valid, b.i64(-1)])
        real = b.op("Compress", [flat_off, flat_valid], axis=0)
        pad = b.op("Compress", [flat_off, b.op("Not", [flat_valid])], axis=0)
        shape = b.op("Concat", [n_seq, s_max], axis=0)
        token_offset = b.op(
            "Cast",
            [b.op("Reshape", [b.op("Concat", [real, pad], axis=0), shape])],
            to=TensorProto.INT32,
            name="token_offset",
        )
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

    def skip_ln(self, x: str, skip: str, ln: str, bias: str, name: str) -> tuple[str, str]:
        """LayerNorm(x + bias + skip) and the sum itself (SkipLayerNormalization outputs 0 and 3)."""
        g = self.weight(f"{name}.gamma", self.p(f"{ln}.weight"))
        beta = self.weight(f"{name}.beta", self.p(f"{ln}.bias"))
        bvec = self.weight(f"{name}.bias", self.p(bias))
        out, _mean, _inv_std, total = self.b.op(
            "SkipLayerNormalization",
            [x, skip, g, beta, bvec],
            n_out=4,
            domain=MS_DOMAIN,
            epsilon=self.eps,
            name=name,
        )
        # Unused optional outputs are dropped (empty names) so runtimes need not compute them.
        node = self.b.nodes[-1]
        node.output[1] = ""
        node.output[2] = ""
        return out, total

    def pool(self, hidden: str) -> str:
        """Mean over residues (positions 1 .. len-2 of each sequence), zero for sequences without residues."""
        b = self.b
        g = self.seq_geometry()
        after_cls = b.op("Greater", [g["tok_row"], g["starts_col"]])
        before_eos = b.op("Less", [g["tok_row"], b.op("Sub", [g["ends_col"], b.const(1, np.int64)])])
        residue = b.op(
            "Cast", [b.op("And", [after_cls, before_eos])], to=TensorProto.FLOAT, name="residue_mask"
        )
        count = b.op("ReduceSum", [residue, b.i64(1)], keepdims=1, name="residue_count")  # [B, 1]
        total = b.op("MatMul", [residue, hidden], name="residue_sum")  # [B, H]
        return b.op("Div", [total, b.op("Max", [count, b.const(1.0, np.float32)])], name="mean_pooled")

    def build(self) -> onnx.ModelProto:
        self.opt.validate(self.cfg["num_layers"])
        x = self.build_layers()
        hidden32 = (
            x if self.act is np.float32 else self.b.op("Cast", [x], to=TensorProto.FLOAT, name="hidden32")
        )
        mean = self.pool(hidden32)
        b = self.b
        b.nodes.append(helper.make_node("Identity", [mean], ["mean"], name="out_mean"))
        outputs = [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", self.h])]
        if self.opt.per_token:
            b.nodes.append(helper.make_node("Identity", [hidden32], ["hidden"], name="out_hidden"))
            outputs.append(
                helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["total_tokens", self.h])
            )
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["total_tokens"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["total_tokens"]),
            helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["batch_plus_1"]),
        ]
        graph = helper.make_graph(b.nodes, f"{self.cfg['name']}_packed", inputs, outputs, self.store.tensors)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        if self.opt.attention == "virnuc":
            opsets.append(helper.make_opsetid(VIRNUC_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="virnuc-export")
        model.ir_version = 8  # opset 17 era; readable by ONNX Runtime >= 1.13 and TensorRT 10
        return model


def block_diagonal_bias(b: Builder, seq_id: str) -> str:
    """[T, T] float32: 0 where two tokens belong to the same sequence, MASK_VALUE elsewhere."""
    same = b.op("Equal", [b.op("Unsqueeze", [seq_id, b.i64(1)]), b.op("Unsqueeze", [seq_id, b.i64(0)])])
    return b.op("Where", [same, b.const(0.0, np.float32), b.const(MASK_VALUE, np.float32)], name="block_bias")


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


class _ConfigOnly(WeightSource):
    kind = "none"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


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
    g = EsmGraph(_ConfigOnly(config), GraphOptions(attention=attention, precision=precision), store)
    out = g.attention("qkv", 0)
    g.b.nodes.append(helper.make_node("Identity", [out], ["out"], name="out_identity"))
    inputs = [
        helper.make_tensor_value_info("qkv", g.act_onnx, ["total_tokens", 3 * hidden]),
        helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["batch_plus_1"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["total_tokens"]),
    ]
    outputs = [helper.make_tensor_value_info("out", g.act_onnx, ["total_tokens", hidden])]
    graph = helper.make_graph(g.b.nodes, f"{attention}_attention", inputs, outputs, store.tensors)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    if attention == "virnuc":
        opsets.append(helper.make_opsetid(VIRNUC_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="virnuc-export")
    model.ir_version = 8
    return model
