"""What every packed graph shares: options, initializer storage, the node builder and the base class
with the sequence geometry derived from `cu_seqlens`, layer norms, GELU, the block-diagonal bias, the
pooling rules and the graph's inputs/outputs.

Inputs (every family, every flavor): `input_ids` int64 [T], `position_ids` int64 [T], `cu_seqlens` int32
[B+1]. Outputs: `mean` float32 [B, H] and optionally `hidden` float32 [T, H]. The families' graphs are in
`graph.py` (ESM-2) and `graph_dnabert.py` (DNABERT-S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
    # Debug switches for the tests that show the checks can fail; never set in real exports.
    skip_token_dropout_rescale: bool = False  # ESM-2
    debug: tuple[str, ...] = ()  # DNABERT-S, see graph_dnabert.DEBUG_SWITCHES

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


class PackedGraph:
    """Writes the packed graph of one family for one weight source and set of options. Subclasses give
    `build_layers` (the residual stream of `repr_layer`) and `pooling`."""

    pooling = "mean_residues"  # or "mean_all_tokens"

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

    def padded_token_offset(self) -> tuple[str, str]:
        """PackedMultiHeadAttention's token_offset [B, S] int32: the flattened padded positions b·S + s,
        those of the real tokens first (in packed order), then the padding positions; S = the longest
        sequence. Also returns the padded position grid 0..S-1 (int64), for biases over that layout."""
        b = self.b
        lens = self.seq_geometry()["lens"]
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
        return token_offset, grid_s

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

    def block_bias(self) -> str:
        if "block_bias" not in self._cache:
            self._cache["block_bias"] = block_diagonal_bias(self.b, self.seq_geometry()["seq_id"])
        return self._cache["block_bias"]

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
        """`mean` [B, H] float32 from `hidden` [T, H] float32 by the family's rule: `mean_residues` —
        positions 1 .. len-2 of each sequence (zero for sequences without residues); `mean_all_tokens` —
        every token (zero for an empty sequence)."""
        b = self.b
        g = self.seq_geometry()
        after_start = b.op("GreaterOrEqual", [g["tok_row"], g["starts_col"]])
        before_end = b.op("Less", [g["tok_row"], g["ends_col"]])
        if self.pooling == "mean_residues":
            after_start = b.op("Greater", [g["tok_row"], g["starts_col"]])
            before_end = b.op("Less", [g["tok_row"], b.op("Sub", [g["ends_col"], b.const(1, np.int64)])])
        elif self.pooling != "mean_all_tokens":
            raise ValueError(f"unknown pooling {self.pooling!r}")
        member = b.op(
            "Cast", [b.op("And", [after_start, before_end])], to=TensorProto.FLOAT, name="pool_mask"
        )
        count = b.op("ReduceSum", [member, b.i64(1)], keepdims=1, name="pool_count")  # [B, 1]
        total = b.op("MatMul", [member, hidden], name="pool_sum")  # [B, H]
        return b.op("Div", [total, b.op("Max", [count, b.const(1.0, np.float32)])], name="mean_pooled")

    def build_layers(self) -> str:
        raise NotImplementedError

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
        graph = helper.make_graph(
            b.nodes, f"{self.cfg['name']}_packed", graph_inputs(), outputs, self.store.tensors
        )
        return make_model(graph, self.opt.attention == "virnuc")


def graph_inputs() -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["total_tokens"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["total_tokens"]),
        helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["batch_plus_1"]),
    ]


def make_model(graph: onnx.GraphProto, virnuc_domain: bool) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    if virnuc_domain:
        opsets.append(helper.make_opsetid(VIRNUC_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="virnuc-export")
    model.ir_version = 8  # opset 17 era; readable by ONNX Runtime >= 1.13 and TensorRT 10
    return model


def block_diagonal_bias(b: Builder, seq_id: str) -> str:
    """[T, T] float32: 0 where two tokens belong to the same sequence, MASK_VALUE elsewhere."""
    same = b.op("Equal", [b.op("Unsqueeze", [seq_id, b.i64(1)]), b.op("Unsqueeze", [seq_id, b.i64(0)])])
    return b.op("Where", [same, b.const(0.0, np.float32), b.const(MASK_VALUE, np.float32)], name="block_bias")


class ConfigOnly(WeightSource):
    """A source without weights, for graphs of single ops (attention-level tests)."""

    kind = "none"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
