"""Opt-in (VIRNUC_BIG_TESTS=1, ~3 GB RAM, a few minutes): esm2_t33_650M with random weights, exported
with external data, masked flavor on ORT CPU vs HF `EsmModel` — the real head dim (64), depth and
external-data path at full size."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from export_helpers import cosine, pack, random_protein, residue_mean, run, session, token_rel_error
from virnuc_export.config import tokenize
from virnuc_export.export import export
from virnuc_export.graph import GraphOptions
from virnuc_export.reference import embed_one, hf_model_from_source
from virnuc_export.weights import RandomWeights

pytestmark = pytest.mark.skipif(os.environ.get("VIRNUC_BIG_TESTS") != "1", reason="set VIRNUC_BIG_TESTS=1")


def test_650m_masked_external_data_matches_hf(tmp_path):
    src = RandomWeights("esm2_t33_650M", 0)
    result = export(src, GraphOptions(attention="masked", fused=True, per_token=True), tmp_path / "m")
    assert result.data_path is not None
    rng = np.random.default_rng(0)
    tokens = [tokenize(random_protein(rng, n)) for n in (1, 120, 400)]
    out = run(session(result.onnx_path), pack(tokens))
    del result
    hf = hf_model_from_source(src)
    cu = np.cumsum([0] + [len(t) for t in tokens])
    for i, t in enumerate(tokens):
        ref = embed_one(hf, t, None, torch.float32)
        rel = token_rel_error(out["hidden"][cu[i] : cu[i + 1]], ref)
        cos = cosine(out["mean"][i], residue_mean(ref))
        print(f"650M len {len(t) - 2}: per-token rel {rel:.2e}, mean cosine {cos:.8f}")
        assert rel <= 1e-4 and cos >= 0.99999
