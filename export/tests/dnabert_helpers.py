"""Helpers of the DNABERT-S exporter tests: random token sequences, packing, the float64 reference and a
cache of exports keyed by options (CPU only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export_helpers import TESTS, cosine, pack, run, session, token_rel_error
from virnuc_export import dnabert_reference
from virnuc_export.export import export
from virnuc_export.graph import GraphOptions
from virnuc_export.weights import RandomWeights

DNABERT_TINY = str(TESTS / "dnabert_tiny.yaml")
CLS, SEP = 1, 2
MAX_REL, MIN_COS = 1e-5, 0.99999


def random_tokens(rng: np.random.Generator, n: int, vocab: int = 4096) -> list[int]:
    """n tokens as the tokenizer gives them: [CLS] ids… [SEP] (n = 1: [CLS] alone)."""
    if n == 1:
        return [CLS]
    return [CLS, *(int(t) for t in rng.integers(5, vocab, n - 2)), SEP]


@dataclass
class Dnabert:
    """A random-weight DNABERT-S model, its float64 reference and an export cache."""

    source: RandomWeights
    workdir: Path
    _w64: dict = field(default_factory=dict)
    _refs: dict = field(default_factory=dict)

    def export(self, **kw: object) -> Path:
        kw.setdefault("fused", False)
        kw.setdefault("attention", "masked")
        options = GraphOptions(per_token=True, **kw)  # type: ignore[arg-type]
        key = "_".join(f"{k}-{v}" for k, v in sorted(kw.items()))
        out = self.workdir / key.replace("/", "_").replace(" ", "")
        if not (out / "model.onnx").exists():
            export(self.source, options, out)
        return out / "model.onnx"

    def reference(self, tokens: list[int]) -> np.ndarray:
        key = tuple(tokens)
        if key not in self._refs:
            if not self._w64:
                self._w64 = {k: v.astype(np.float64) for k, v in self.source.items()}
            self._refs[key] = dnabert_reference.forward(self._w64, self.source.config, tokens)
        return self._refs[key]


def compare(model: Dnabert, path: Path, token_lists: list[list[int]], **pack_kw: bool) -> tuple[float, float]:
    """(max per-token relative error, min mean cosine) of the export on one pack vs the float64 reference
    of each sequence alone."""
    out = run(session(path), pack(token_lists, **pack_kw))
    cu = np.cumsum([0] + [len(t) for t in token_lists])
    worst_err, worst_cos = 0.0, 1.0
    for i, t in enumerate(token_lists):
        ref = model.reference(t)
        worst_err = max(worst_err, token_rel_error(out["hidden"][cu[i] : cu[i + 1]], ref))
        worst_cos = min(worst_cos, cosine(out["mean"][i], dnabert_reference.mean_all_tokens(ref)))
    return worst_err, worst_cos


__all__ = ["DNABERT_TINY", "MAX_REL", "MIN_COS", "Dnabert", "compare", "random_tokens"]
