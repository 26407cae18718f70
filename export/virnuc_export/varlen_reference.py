"""Float64 numpy oracle of `com.virnuc:VarlenAttention` (plugins/varlen_attention/README.md, version 2:
rotary mode for ESM-2, ALiBi mode for DNABERT-S).

The runtime's CPU op, the CUDA kernel and the TensorRT plugin are tested against this function; it is
itself tested against the exporter's standard-ops (`masked`) attention, which is tested against HF
transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> np.ndarray:
    """inv_freq[i] = base^(-2i/D) in float32, as HF / fair-esm compute it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(base) ** exponent)).astype(np.float32)


def apply_rotary(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """rotate_half rotary on x [T, heads, D] (float64 math; angles computed in float32 per the contract)."""
    d = x.shape[-1]
    angle = (positions.astype(np.float32)[:, None] * rotary_inv_freq(d, base)[None, :]).astype(np.float64)
    cos = np.cos(angle)[:, None, :]  # [T, 1, D/2]
    sin = np.sin(angle)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def varlen_attention(
    qkv: np.ndarray,
    cu_seqlens: np.ndarray,
    position_ids: np.ndarray | None,
    num_heads: int,
    scale: float | None = None,
    rotary: int = 1,
    rotary_base: float = 10000.0,
    alibi_slopes: Sequence[float] | None = None,
) -> np.ndarray:
    """qkv [T, 3·H·D] → out [T, H·D], float64. Each token attends only to its own sequence.

    ALiBi mode (`alibi_slopes` of length H, non-empty; needs rotary=0): score[h, i, j] =
    scale·q_i·k_j - alibi_slopes[h]·|i - j|, i and j the tokens' offsets inside their sequence (from
    cu_seqlens; position_ids are not used). The slopes are taken as float32, as the attribute holds them."""
    qkv = np.asarray(qkv, dtype=np.float64)
    total, width = qkv.shape
    if width % (3 * num_heads) != 0:
        raise ValueError(f"qkv width {width} is not a multiple of 3 · num_heads ({num_heads})")
    d = width // (3 * num_heads)
    hd = num_heads * d
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu[0] != 0 or cu[-1] != total or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_seqlens {cu.tolist()} does not describe {total} tokens")
    scale = d**-0.5 if scale is None else scale
    slopes = None
    if alibi_slopes is not None and len(alibi_slopes) > 0:
        if rotary:
            raise ValueError("alibi_slopes needs rotary=0 (the two position modes exclude each other)")
        if len(alibi_slopes) != num_heads:
            raise ValueError(f"{len(alibi_slopes)} alibi_slopes for {num_heads} heads")
        slopes = np.asarray(alibi_slopes, dtype=np.float32).astype(np.float64)
    q = qkv[:, :hd].reshape(total, num_heads, d)
    k = qkv[:, hd : 2 * hd].reshape(total, num_heads, d)
    v = qkv[:, 2 * hd :].reshape(total, num_heads, d)
    if rotary:
        if position_ids is None:
            raise ValueError("rotary=1 needs position_ids")
        pos = np.asarray(position_ids)
        q = apply_rotary(q, pos, rotary_base)
        k = apply_rotary(k, pos, rotary_base)
    out = np.zeros((total, num_heads, d), dtype=np.float64)
    for b in range(len(cu) - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        if e == s:
            continue
        scores = np.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale
        if slopes is not None:
            offsets = np.arange(e - s)
            scores -= slopes[:, None, None] * np.abs(offsets[:, None] - offsets[None, :])[None]
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[s:e] = np.einsum("hqk,khd->qhd", p, v[s:e])
    return out.reshape(total, hd)
