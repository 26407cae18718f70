"""Float64 numpy reference of DNABERT-S, one sequence at a time (no packing, no padding).

Written from the original model code (MAGICS-LAB/DNABERT_S, `evaluate/model_codes/bert_layers.py`:
`BertEmbeddings`, `BertUnpadSelfAttention`, `BertSelfOutput`, `BertGatedLinearUnitMLP`, `BertEncoder`
with its ALiBi tensor, `BertModel` without pooler), not from the exporter's graph builder, whose packed
graph is tested against it. Only the weights (a dict of `BertModel` state-dict names) are shared.

`forward(weights, config, ids)` returns the states [L, H] after the last layer (or layer `layers`);
`mean_all_tokens` is VirNucPro's pooling (`torch.mean(hidden_states[0], dim=0)`: every token, `[CLS]` and
`[SEP]` included).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def alibi_head_slopes(n_heads: int) -> list[float]:
    """The original `_get_alibi_head_slopes`: geometric slopes for 2^k heads; otherwise those of the
    nearest smaller power of two followed by every other slope of the next larger one."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    lower = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(lower) + alibi_head_slopes(2 * lower)[0::2][: n_heads - lower]


def alibi_slopes_f32(n_heads: int) -> np.ndarray:
    """The slopes as the original holds them (`torch.Tensor(list)`: float32)."""
    return np.asarray(alibi_head_slopes(n_heads), dtype=np.float32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU (`nn.GELU(approximate='none')`), x · Φ(x), in float64 (erf from torch: numpy has none)."""
    import torch

    erf = torch.special.erf(torch.from_numpy(x / math.sqrt(2.0))).numpy()
    return 0.5 * x * (1.0 + erf)


def forward(
    weights: dict[str, Any], config: dict[str, Any], ids: list[int] | np.ndarray, layers: int | None = None
) -> np.ndarray:
    """States [L, H] (float64) of one sequence of token ids after `layers` layers (default: all; 0 =
    the embeddings after their LayerNorm). `weights`: `BertModel` state-dict names → arrays."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    eps = float(config["layer_norm_eps"])
    nh = int(config["num_heads"])
    hidden = int(config["hidden_size"])
    d = hidden // nh
    inter = int(config["ffn_size"])
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    # BertEmbeddings: word + token type 0 (no position embeddings: ALiBi), LayerNorm.
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    # BertEncoder.rebuild_alibi_tensor: slopes · -|j - i| for [heads, L, L].
    rel = np.abs(np.arange(n)[None, :] - np.arange(n)[:, None]).astype(np.float64)
    alibi = -alibi_slopes_f32(nh).astype(np.float64)[:, None, None] * rel[None]
    for i in range(int(config["num_layers"]) if layers is None else layers):
        pre = f"encoder.layer.{i}"
        # BertUnpadSelfAttention: Wqkv, 'b s (t h d) -> b s t h d', scores / sqrt(d) + bias, softmax.
        qkv = x @ w[f"{pre}.attention.self.Wqkv.weight"].T + w[f"{pre}.attention.self.Wqkv.bias"]
        qkv = qkv.reshape(n, 3, nh, d)
        q = qkv[:, 0].transpose(1, 0, 2)  # [h, L, d]
        k = qkv[:, 1].transpose(1, 2, 0)  # [h, d, L]
        v = qkv[:, 2].transpose(1, 0, 2)
        scores = q @ k / math.sqrt(d) + alibi
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        # BertSelfOutput: LayerNorm(dense(ctx) + input).
        dense = ctx @ w[f"{pre}.attention.output.dense.weight"].T + w[f"{pre}.attention.output.dense.bias"]
        x = _layer_norm(
            dense + x,
            w[f"{pre}.attention.output.LayerNorm.weight"],
            w[f"{pre}.attention.output.LayerNorm.bias"],
            eps,
        )
        # BertGatedLinearUnitMLP: gated_layers (no bias), gelu(first half) * second half, wo, post-LN.
        g = x @ w[f"{pre}.mlp.gated_layers.weight"].T
        h = _gelu_erf(g[:, :inter]) * g[:, inter:]
        out = h @ w[f"{pre}.mlp.wo.weight"].T + w[f"{pre}.mlp.wo.bias"]
        x = _layer_norm(out + x, w[f"{pre}.mlp.layernorm.weight"], w[f"{pre}.mlp.layernorm.bias"], eps)
    return x


def mean_all_tokens(states: np.ndarray) -> np.ndarray:
    """VirNucPro's pooling: the plain mean over every token of the sequence."""
    return states.mean(axis=0)
