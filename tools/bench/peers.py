"""The PyTorch peers, end to end: protein FASTA in → mean embeddings HDF5 out, timed as a user would run them.

- `hf-eager`: HF transformers `EsmModel`, eager attention, padded length-sorted batches (fair-esm batching,
  VirNucPro v1.0), fp32 by default;
- `hf-sdpa`: the same model with SDPA attention and padding, fp16 on GPU (the usual quick fix);
- `torch-packed`: `packed_esm.PackedEsm`, FFD packs, flash varlen attention (VirNucPro v2.0 / FAESM).

Model build (weights to the device) is timed apart from the run. The timed run reads the FASTA, tokenizes,
batches, runs, pools, copies back and writes the HDF5 file (`sequence_ids`, `embeddings`, `lengths`, as
`virnuc-trt embed`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from packed_esm import PAD, PackedEsm, PackedInputs, ffd_packs, padded_batches

TORCH_PEERS = ("hf-eager", "hf-sdpa", "torch-packed")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunStats:
    """What one tool did on one workload; the harness adds GPU figures and cosines."""

    sequences: int
    tokens: int  # real tokens (<cls>/<eos> included, padding not)
    processed_tokens: int  # tokens the model computed on, padding included
    batches: int
    seconds: float  # the timed end-to-end run
    load_seconds: float  # model build / session creation, not in `seconds`
    attention: str
    extra: dict[str, Any] = field(default_factory=dict)


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """[(id, sequence)] — ids are the first word of the header, as `virnuc-trt` writes them."""
    records: list[tuple[str, str]] = []
    name: str | None = None
    parts: list[str] = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if name is not None:
                    records.append((name, "".join(parts)))
                words = line[1:].split(maxsplit=1)
                name, parts = (words[0] if words else ""), []
            elif line:
                parts.append(line)
    if name is not None:
        records.append((name, "".join(parts)))
    return records


def write_embeddings_h5(path: Path, ids: list[str], embeddings: np.ndarray, lengths: np.ndarray) -> None:
    """The output layout of `virnuc-trt embed` (and virnucpro-broad's embeddings.h5)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("sequence_ids", data=ids, dtype=h5py.string_dtype())
        f.create_dataset("embeddings", data=embeddings.astype(np.float32))
        f.create_dataset("lengths", data=lengths.astype(np.int64))
    tmp.replace(path)


def read_embeddings_h5(path: Path) -> tuple[list[str], np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        raw = f["sequence_ids"][()]
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
        return ids, np.asarray(f["embeddings"][()], dtype=np.float32)


def hf_model(
    config: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    attn: str,
) -> torch.nn.Module:
    """HF `EsmModel` with exactly these canonical weights (HF names, no `esm.` prefix)."""
    from transformers import EsmConfig, EsmModel

    hf_config = EsmConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_hidden_layers=int(config["num_layers"]),
        num_attention_heads=int(config["num_heads"]),
        intermediate_size=int(config["ffn_size"]),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=int(config["max_positions"]),
        position_embedding_type="rotary",
        layer_norm_eps=float(config["layer_norm_eps"]),
        token_dropout=float(config["token_dropout_scale"]) != 1.0,
        mask_token_id=32,
        pad_token_id=PAD,
        emb_layer_norm_before=False,
        attn_implementation=attn,
    )
    with torch.device(device):
        model = EsmModel(hf_config, add_pooling_layer=False)
    if getattr(model.config, "_attn_implementation", attn) != attn:
        model.set_attn_implementation(attn)
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    # Only buffers and the contact head (unused for embeddings) may be missing.
    real_missing = [k for k in missing if not k.startswith("contact_head") and "inv_freq" not in k]
    if real_missing or unexpected:
        raise RuntimeError(f"HF EsmModel weights: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokenize(seqs: list[str], max_residues: int) -> list[list[int]]:
    from virnuc_export.config import tokenize

    return [tokenize(s, max_residues) for s in seqs]


class TorchPeer:
    """One PyTorch peer with its model built once; `run` can then be called per workload."""

    def __init__(
        self,
        kind: str,
        config: Mapping[str, Any],
        weights: Mapping[str, torch.Tensor],
        device: torch.device,
        precision: str,
        budget: int,
    ) -> None:
        if kind not in TORCH_PEERS:
            raise ValueError(f"unknown torch peer {kind!r} (known: {', '.join(TORCH_PEERS)})")
        self.kind, self.config, self.device, self.budget = kind, config, device, budget
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.max_residues = int(config["max_residues"])
        t0 = time.perf_counter()
        self.packed: PackedEsm | None = None
        self.hf: torch.nn.Module | None = None
        if kind == "torch-packed":
            self.packed = PackedEsm(config, weights, device, self.dtype)
            self.attention = self.packed.attention_name
        else:
            attn = "eager" if kind == "hf-eager" else "sdpa"
            self.hf = hf_model(config, weights, device, self.dtype, attn)
            self.attention = attn
        _sync(device)
        self.load_seconds = time.perf_counter() - t0

    def warmup(self) -> None:
        """One small batch, so that one-time kernel selection is not in the timed run."""
        self._embed([[0, *([5] * 100), 2]] * 4, [[0, 1, 2, 3]])
        _sync(self.device)

    def _embed(self, tokens: list[list[int]], batches: list[list[int]]) -> torch.Tensor:
        """Mean embeddings [N, H] fp32 on the device, in the order of `tokens`."""
        n, h = len(tokens), int(self.config["hidden_size"])
        out = torch.empty(n, h, dtype=torch.float32, device=self.device)
        pin = self.device.type == "cuda"
        with torch.inference_mode():
            for batch in batches:
                # Every host-to-device copy from pinned memory: a copy from pageable memory waits for the
                # stream, which would idle the GPU between batches.
                index = torch.tensor(batch, dtype=torch.int64)
                if pin:
                    index = index.pin_memory()
                index = index.to(self.device, non_blocking=True)
                if self.packed is not None:
                    inputs = PackedInputs.from_token_lists([tokens[i] for i in batch], self.device)
                    out[index] = self.packed.mean_embeddings(inputs)
                    continue
                assert self.hf is not None
                longest = max(len(tokens[i]) for i in batch)
                ids = torch.full((len(batch), longest), PAD, dtype=torch.int64)
                for row, i in enumerate(batch):
                    ids[row, : len(tokens[i])] = torch.tensor(tokens[i], dtype=torch.int64)
                lengths = torch.tensor([len(tokens[i]) for i in batch], dtype=torch.int64)
                if pin:
                    ids, lengths = ids.pin_memory(), lengths.pin_memory()
                ids = ids.to(self.device, non_blocking=True)
                lengths = lengths.to(self.device, non_blocking=True)
                mask = (ids != PAD).to(torch.int64)
                states = self.hf(input_ids=ids, attention_mask=mask).last_hidden_state
                pos = torch.arange(longest, device=self.device)[None, :]
                keep = ((pos > 0) & (pos < (lengths[:, None] - 1))).unsqueeze(-1)
                sums = (states.float() * keep).sum(dim=1)
                out[index] = sums / (lengths - 2).clamp(min=1).unsqueeze(1).float()
        return out

    def run(self, fasta: Path, out_h5: Path) -> tuple[RunStats, list[str], np.ndarray]:
        """The timed end-to-end run; returns its figures, the ids and the embeddings (input order)."""
        _sync(self.device)
        t0 = time.perf_counter()
        records = read_fasta(fasta)
        ids = [r[0] for r in records]
        tokens = _tokenize([r[1] for r in records], self.max_residues)
        lengths = [len(t) for t in tokens]
        if self.kind == "torch-packed":
            batches = ffd_packs(lengths, self.budget)
            processed = sum(lengths)
        else:
            batches = padded_batches(lengths, self.budget)
            processed = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        emb = self._embed(tokens, batches).cpu().numpy()
        write_embeddings_h5(out_h5, ids, emb, np.asarray(lengths) - 2)
        seconds = time.perf_counter() - t0
        stats = RunStats(
            sequences=len(ids),
            tokens=sum(lengths),
            processed_tokens=processed,
            batches=len(batches),
            seconds=seconds,
            load_seconds=self.load_seconds,
            attention=self.attention,
        )
        return stats, ids, emb

    def close(self) -> None:
        self.packed = None
        self.hf = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def canonical_weights_torch(name: str, seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
    """The exporter's seeded random weights (`virnuc_export.weights.RandomWeights`) as fp32 CPU tensors.

    The same call the exporter makes, so the ONNX graph virnuc-trt runs and every peer hold identical
    numbers. Returns (config, weights, seconds).
    """
    from virnuc_export.weights import RandomWeights

    t0 = time.perf_counter()
    source = RandomWeights(name, seed)
    weights = {k: torch.from_numpy(v) for k, v in source.items()}
    return dict(source.config), weights, time.perf_counter() - t0
