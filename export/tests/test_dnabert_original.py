"""A second, independent reference: the original MosaicBERT code of DNABERT-S itself, through transformers'
`trust_remote_code`, from a local folder (never a hub).

Opt-in: set VIRNUC_DNABERT_CODE to a folder holding the original `bert_layers.py`, `bert_padding.py`,
`configuration_bert.py`, `flash_attn_triton.py` and `config.json` (MAGICS-LAB/DNABERT_S
`evaluate/model_codes/`; not part of this repository), with `einops` importable (not in the lock). The test
copies the files, writes a 2-layer config and our random weights next to them, and compares the original
forward (float64, its PyTorch attention path) with the float64 numpy reference and the ONNX export.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dnabert_helpers import Dnabert, random_tokens
from export_helpers import pack, run, session, token_rel_error
from virnuc_export import dnabert_reference

CODE = os.environ.get("VIRNUC_DNABERT_CODE")
FILES = ("bert_layers.py", "bert_padding.py", "configuration_bert.py", "flash_attn_triton.py", "config.json")

pytestmark = pytest.mark.skipif(
    not CODE or importlib.util.find_spec("einops") is None,
    reason="opt-in: VIRNUC_DNABERT_CODE=<folder with the original DNABERT-S model code> and einops installed",
)


def test_original_code_agrees_with_reference_and_export(dnabert: Dnabert, tmp_path: Path):
    from transformers import AutoModel

    assert CODE is not None
    folder = tmp_path / "original"
    folder.mkdir()
    for name in FILES:
        shutil.copy(Path(CODE) / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = dnabert.source.config["num_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({k: torch.from_numpy(v) for k, v in dnabert.source.items()}, folder / "pytorch_model.bin")
    original = (
        AutoModel.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval().double()
    )
    rng = np.random.default_rng(71)
    seqs = [random_tokens(rng, n) for n in (2, 37, 300)]
    out = run(session(dnabert.export()), pack(seqs))
    cu = np.cumsum([0] + [len(t) for t in seqs])
    for i, t in enumerate(seqs):
        with torch.no_grad():
            states = original(torch.tensor([t]))[0][0].numpy()
        # The original adds its ALiBi tensor in float32 even in a float64 model: ~1e-9 apart.
        assert token_rel_error(dnabert.reference(t), states) <= 1e-7
        assert token_rel_error(out["hidden"][cu[i] : cu[i + 1]], states) <= 1e-5
        np.testing.assert_allclose(
            out["mean"][i], dnabert_reference.mean_all_tokens(states), rtol=1e-4, atol=1e-5
        )
