"""A packed ESM-2 forward in PyTorch: the "torch packed + flash varlen" peer of the benchmark.

This is the approach of VirNucPro v2.0, broadinstitute/virnucpro-broad and FAESM: sequences are
concatenated without padding into packs of at most a token budget (first-fit decreasing), attention runs
per sequence through flash attention's variable-length entry point (`cu_seqlens`), and rotary positions
restart at 0 for each sequence. Written here from the ESM-2 semantics in ARCHITECTURE.md (fair-esm /
HF `EsmModel`): x0.88 token-dropout rescale, pre-LN layers, q scaled by head_dim^-0.5, rotary
(rotate_half, base 10000), exact-erf GELU, final `emb_layer_norm_after`, mean over residues without
`<cls>`/`<eos>`.

Weights come in the exporter's canonical form (HF `EsmModel` state-dict names, no `esm.` prefix), so the
peer, the HF peers and the exported ONNX graph all run the very same numbers.

On CUDA with fp16/bf16 attention is `aten._flash_attention_forward` (varlen); elsewhere (CPU, fp32) a
per-sequence math fallback with the same result, which the test uses to prove this forward equals HF.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)

CLS, PAD, EOS = 0, 1, 2

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def flash_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Non-causal attention over packed [T, heads, head_dim] q/k/v; sequences delimited by cu_seqlens.

    `aten._flash_attention_forward` (torch >= 2.2, the kernel behind SDPA's flash backend, varlen entry);
    where its signature differs, torch's public `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10).
    """
    global _FLASH_IMPL
    if _FLASH_IMPL is None:
        # Settle once on an entry point that accepts these (strided q/k/v views of one qkv tensor).
        tries: list[tuple[str, Callable[[], torch.Tensor]]] = [
            ("aten", lambda: _aten_flash(q, k, v, cu_seqlens, max_seqlen, scale)),
            ("aten-contiguous", lambda: _aten_flash(*_contig(q, k, v), cu_seqlens, max_seqlen, scale)),
            ("varlen_attn", lambda: _public_varlen(*_contig(q, k, v), cu_seqlens, max_seqlen, scale)),
        ]
        errors = []
        for name, call in tries:
            try:
                out = call()
                _FLASH_IMPL = name
                return out
            except (TypeError, RuntimeError, ImportError) as exc:
                errors.append(f"{name}: {exc}")
        raise RuntimeError("no flash varlen attention in this torch: " + "; ".join(errors))
    if _FLASH_IMPL == "aten":
        return _aten_flash(q, k, v, cu_seqlens, max_seqlen, scale)
    if _FLASH_IMPL == "aten-contiguous":
        return _aten_flash(*_contig(q, k, v), cu_seqlens, max_seqlen, scale)
    return _public_varlen(*_contig(q, k, v), cu_seqlens, max_seqlen, scale)


def _contig(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.contiguous(), k.contiguous(), v.contiguous()


def _public_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)


_FLASH_IMPL: str | None = None


def _aten_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False, scale=scale
    )[0]


def flash_impl() -> str | None:
    """Which flash entry point the first call settled on (None before the first call)."""
    return _FLASH_IMPL


def math_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """The same contract as `flash_varlen_attention`, one sequence at a time with explicit softmax.

    For CPU and fp32, where flash attention does not exist; accumulates in fp32.
    """
    del max_seqlen
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        qs = q[start:end].transpose(0, 1).float()  # [heads, L, d]
        ks = k[start:end].transpose(0, 1).float()
        vs = v[start:end].transpose(0, 1).float()
        probs = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1)
        out[start:end] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out


def pick_attention(device: torch.device, dtype: torch.dtype) -> tuple[str, AttentionFn]:
    """Flash varlen where it exists (CUDA, 16-bit), the math fallback otherwise."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash-varlen", flash_varlen_attention
    return "math", math_varlen_attention


@dataclass
class PackedInputs:
    """One pack: sequences concatenated, each `<cls> … <eos>`.

    The pooling indices are computed on the host, so that pooling needs no device-to-host round trip
    (boolean-mask indexing would synchronize the stream on every pack and idle the GPU).
    """

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for each sequence
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    residue_index: torch.Tensor  # [R] int64: the tokens that are residues (no <cls>/<eos>)
    residue_seq: torch.Tensor  # [R] int64: the sequence each of them belongs to
    residue_count: torch.Tensor  # [B] float32: residues per sequence (at least 1)

    @staticmethod
    def from_token_lists(tokens: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> PackedInputs:
        lengths = [len(t) for t in tokens]
        flat = [tok for t in tokens for tok in t]
        positions = [p for n in lengths for p in range(n)]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        residue_index = [cu[b] + p for b, n in enumerate(lengths) for p in range(1, n - 1)]
        residue_seq = [b for b, n in enumerate(lengths) for _ in range(1, n - 1)]
        pin = torch.device(device).type == "cuda"

        def make(values: list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
            t = torch.tensor(values, dtype=dtype)
            if pin:
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return PackedInputs(
            input_ids=make(flat, torch.int64),
            position_ids=make(positions, torch.int64),
            cu_seqlens=make(cu, torch.int32),
            max_seqlen=max(lengths) if lengths else 0,
            residue_index=make(residue_index, torch.int64),
            residue_seq=make(residue_seq, torch.int64),
            residue_count=make([float(max(n - 2, 1)) for n in lengths], torch.float32),
        )


@dataclass
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor  # [3H, H]: query, key, value stacked so that one matmul makes all three
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


class PackedEsm:
    """ESM-2 over packed sequences, from canonical weights, in `dtype` on `device`."""

    def __init__(
        self,
        config: Mapping[str, Any],
        weights: Mapping[str, Any],
        device: torch.device | str,
        dtype: torch.dtype,
        attention: AttentionFn | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_heads"])
        self.head_dim = self.hidden // self.heads
        self.eps = float(config["layer_norm_eps"])
        self.token_scale = float(config["token_dropout_scale"])
        self.rotary_base = float(config["rotary_base"])
        self.attention_name, default_attention = pick_attention(self.device, dtype)
        self.attention = attention or default_attention

        def w(name: str) -> torch.Tensor:
            value = weights[name]
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            return t.to(device=self.device, dtype=dtype).contiguous()

        self.embed = w("embeddings.word_embeddings.weight")
        self.layers: list[_Layer] = []
        for i in range(int(config["num_layers"])):
            p = f"encoder.layer.{i}."
            self.layers.append(
                _Layer(
                    ln1_w=w(p + "attention.LayerNorm.weight"),
                    ln1_b=w(p + "attention.LayerNorm.bias"),
                    qkv_w=torch.cat([w(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")]),
                    qkv_b=torch.cat([w(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")]),
                    out_w=w(p + "attention.output.dense.weight"),
                    out_b=w(p + "attention.output.dense.bias"),
                    ln2_w=w(p + "LayerNorm.weight"),
                    ln2_b=w(p + "LayerNorm.bias"),
                    fc1_w=w(p + "intermediate.dense.weight"),
                    fc1_b=w(p + "intermediate.dense.bias"),
                    fc2_w=w(p + "output.dense.weight"),
                    fc2_b=w(p + "output.dense.bias"),
                )
            )
        self.ln_after_w = w("encoder.emb_layer_norm_after.weight")
        self.ln_after_b = w("encoder.emb_layer_norm_after.bias")
        # Rotary tables as HF computes them (fp32), for every position a sequence can have; cast once.
        inv_freq = 1.0 / (
            self.rotary_base
            ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float().to(self.device) / self.head_dim)
        )
        self._inv_freq = inv_freq
        self._cos = torch.empty(0, device=self.device)
        self._sin = torch.empty(0, device=self.device)
        self._ensure_rotary(1026)

    def _ensure_rotary(self, positions: int) -> None:
        if self._cos.shape[0] >= positions:
            return
        t = torch.arange(positions, device=self.device, dtype=torch.float32)
        freqs = torch.outer(t, self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.dtype)
        self._sin = emb.sin().to(self.dtype)

    def _rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, n, heads, d] with cos/sin [T, 1, 1, d]: x·cos + rotate_half(x)·sin."""
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def hidden_states(self, batch: PackedInputs) -> torch.Tensor:
        """Final-layer states [T, H] (after `emb_layer_norm_after`)."""
        h, eps = self.hidden, self.eps
        # Token-dropout rescale (x0.88). Inputs hold no <mask> (a FASTA tokenizer cannot emit it), so the
        # mask-ratio correction of training is 1 and needs no device-side check (which would synchronize).
        x = F.embedding(batch.input_ids, self.embed) * self.token_scale
        self._ensure_rotary(batch.max_seqlen)
        cos = self._cos[batch.position_ids][:, None, None, :]
        sin = self._sin[batch.position_ids][:, None, None, :]
        t = x.shape[0]
        scale = self.head_dim**-0.5
        for layer in self.layers:
            y = F.layer_norm(x, (h,), layer.ln1_w, layer.ln1_b, eps)
            qkv = F.linear(y, layer.qkv_w, layer.qkv_b).view(t, 3, self.heads, self.head_dim)
            # Rotary is linear, so q·scale then rotary (HF's order) equals rotary then the softmax scale.
            qk = self._rotary(qkv[:, :2], cos, sin)
            attn = self.attention(qk[:, 0], qk[:, 1], qkv[:, 2], batch.cu_seqlens, batch.max_seqlen, scale)
            x = x + F.linear(attn.reshape(t, h), layer.out_w, layer.out_b)
            y = F.layer_norm(x, (h,), layer.ln2_w, layer.ln2_b, eps)
            y = F.gelu(F.linear(y, layer.fc1_w, layer.fc1_b))
            x = x + F.linear(y, layer.fc2_w, layer.fc2_b)
        return F.layer_norm(x, (h,), self.ln_after_w, self.ln_after_b, eps)

    @torch.inference_mode()
    def mean_embeddings(self, batch: PackedInputs) -> torch.Tensor:
        """Mean over residues (no `<cls>`/`<eos>`) of each sequence: [B, H] float32."""
        states = self.hidden_states(batch)
        b = batch.residue_count.shape[0]
        sums = torch.zeros(b, states.shape[1], device=states.device, dtype=torch.float32)
        sums.index_add_(0, batch.residue_seq, states.index_select(0, batch.residue_index).float())
        return sums / batch.residue_count.unsqueeze(1)


def ffd_packs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths` grouped into packs of at most `budget` tokens.

    A sequence longer than the budget gets a pack of its own (never dropped).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for j, free in enumerate(room):
            if n <= free:
                packs[j].append(i)
                room[j] -= n
                break
        else:
            packs.append([i])
            room.append(max(budget - n, 0))
    return packs


def padded_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """fair-esm `FastaBatchedDataset.get_batch_indices`: length-sorted, a batch grows while
    (longest in batch) * (sequences) ≤ budget — the batching of VirNucPro v1.0 and `esm-extract`."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    buf: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if buf and max(longest, n) * (len(buf) + 1) > budget:
            batches.append(buf)
            buf, longest = [], 0
        buf.append(i)
        longest = max(longest, n)
    if buf:
        batches.append(buf)
    return batches


def esm_flops_per_token(config: Mapping[str, Any]) -> float:
    """Matrix-product FLOPs per token: 2 · (4H² + 2·H·FFN) per layer = 24·H²·layers for FFN = 4H."""
    h, f, layers = int(config["hidden_size"]), int(config["ffn_size"]), int(config["num_layers"])
    return layers * 2.0 * (4.0 * h * h + 2.0 * h * f)
