"""Helpers shared by the exporter tests: packing, ORT sessions, HF references, cached exports (CPU only).

A uniquely named module (not conftest) so that `from export_helpers import …` cannot pick up another
folder's conftest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from virnuc_export.config import tokenize
from virnuc_export.export import export
from virnuc_export.graph import GraphOptions
from virnuc_export.reference import embed_one
from virnuc_export.weights import RandomWeights

TESTS = Path(__file__).parent
TINY = str(TESTS / "tiny.yaml")
AMINO = "LAGVSERTIDPKQNFYMHWC"
torch.set_num_threads(2)


def random_protein(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(AMINO), n))


def pack(token_lists: list[list[int]], restart_positions: bool = True) -> dict[str, np.ndarray]:
    ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
    if restart_positions:
        pos = np.concatenate([np.arange(len(t), dtype=np.int64) for t in token_lists])
    else:
        pos = np.arange(len(ids), dtype=np.int64)
    cu = np.cumsum([0] + [len(t) for t in token_lists]).astype(np.int32)
    return {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu}


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def token_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Max over tokens of max|got - ref| / max|ref| (per token, over the hidden dimension)."""
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def residue_mean(states: np.ndarray) -> np.ndarray:
    r = states[1:-1]
    return r.mean(axis=0) if len(r) else np.zeros(states.shape[1], dtype=states.dtype)


@dataclass
class Model:
    """A random-weight model, its HF reference and an export cache keyed by options."""

    source: RandomWeights
    hf: object
    workdir: Path
    _refs: dict = field(default_factory=dict)

    def export(self, **kw: object) -> Path:
        per_token = kw.pop("per_token", True)
        options = GraphOptions(per_token=per_token, **kw)  # type: ignore[arg-type]
        key = "_".join(f"{k}-{v}" for k, v in sorted(kw.items())) or "default"
        out = self.workdir / key
        if not (out / "model.onnx").exists():
            export(self.source, options, out)
        return out / "model.onnx"

    def reference(self, tokens: list[int], repr_layer: int | None = None) -> np.ndarray:
        key = (tuple(tokens), repr_layer)
        if key not in self._refs:
            self._refs[key] = embed_one(self.hf, tokens, repr_layer, torch.float32)
        return self._refs[key]


__all__ = ["TINY", "Model", "cosine", "pack", "random_protein", "residue_mean", "run", "session", "tokenize"]
