"""DNABERT-S exports: HF folders (safetensors with a `bert.` prefix, pytorch_model.bin without), model.json
and the ONNX file's own metadata, the CLI, and the project's BPE test tokenizer (format, determinism, and
against the released DNABERT-S tokenizer when ../shared has it)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import save_file

from dnabert_helpers import DNABERT_TINY, Dnabert, random_tokens
from export_helpers import pack, run, session
from test_metadata_cli import rust_struct_fields
from virnuc_export.__main__ import main as export_main
from virnuc_export.config import CONFIG_FIELDS, ESM2_ONLY_FIELDS, repo_root
from virnuc_export.dna_tokenizer import default_test_tokenizer
from virnuc_export.export import METADATA_PROPS_KEY, export
from virnuc_export.graph import GraphOptions
from virnuc_export.weights import DnabertHfWeights, open_source


def _real_tokenizer() -> Path:
    """The released DNABERT-S tokenizer in ../shared/data/dnabert_s (a checkout beside shared/, or a
    worktree one level deeper), or $VIRNUC_SHARED/data/dnabert_s."""
    env = os.environ.get("VIRNUC_SHARED")
    roots = [Path(env)] if env else [repo_root().parent / "shared", repo_root().parents[1] / "shared"]
    for root in roots:
        path = root / "data" / "dnabert_s" / "tokenizer.json"
        if path.exists():
            return path
    return roots[0] / "data" / "dnabert_s" / "tokenizer.json"


REAL_TOKENIZER = _real_tokenizer()


def hf_folder(model: Dnabert, folder: Path, fmt: str) -> Path:
    """A DNABERT-S-style folder as the release has it: MosaicBERT config.json, weights, tokenizer.json."""
    cfg = model.source.config
    folder.mkdir()
    config = {
        "_name_or_path": "zhihan1996/DNABERT-2-117M", "alibi_starting_size": 512,
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "configuration_bert.BertConfig", "AutoModel": "bert_layers.BertModel"},
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["ffn_size"], "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
        "model_type": "bert", "num_attention_heads": cfg["num_heads"], "num_hidden_layers": cfg["num_layers"],
        "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": 4096,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    state = dict(model.source.items())
    h = cfg["hidden_size"]
    extra = {"pooler.dense.weight": np.ones((h, h), np.float32), "pooler.dense.bias": np.ones(h, np.float32)}
    if fmt == "safetensors-prefixed":  # BertForMaskedLM-style names
        save_file({f"bert.{k}": v for k, v in {**state, **extra}.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(
            {k: torch.from_numpy(v) for k, v in {**state, **extra}.items()}, folder / "pytorch_model.bin"
        )
    (folder / "tokenizer.json").write_bytes(default_test_tokenizer().read_bytes())
    return folder


@pytest.mark.parametrize("fmt", ["safetensors-prefixed", "bin"])
def test_hf_folder_exports_the_same_graph_as_its_weights(dnabert_tiny: Dnabert, tmp_path, fmt: str):
    folder = hf_folder(dnabert_tiny, tmp_path / "hf", fmt)
    src = open_source(hf=str(folder))
    assert isinstance(src, DnabertHfWeights) and src.config["family"] == "dnabert_s"
    for name, value in dnabert_tiny.source.items():
        np.testing.assert_array_equal(src.get(name), value, err_msg=name)
    result = export(src, GraphOptions(attention="masked", fused=False, per_token=True), tmp_path / "out")
    meta = result.metadata
    weights_file = folder / ("model.safetensors" if fmt != "bin" else "pytorch_model.bin")
    assert meta["source"]["kind"] == "hf" and meta["random_weights"] is False
    assert meta["source"]["sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    copied = tmp_path / "out" / "tokenizer.json"
    assert copied.read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(copied.read_bytes()).hexdigest()
    rng = np.random.default_rng(3)
    feeds = pack([random_tokens(rng, n) for n in (1, 40, 7)])
    ours = run(session(result.onnx_path), feeds)
    direct = run(session(dnabert_tiny.export()), feeds)
    np.testing.assert_array_equal(ours["hidden"], direct["hidden"])


def test_hf_folder_without_tokenizer_or_unknown_config_is_refused(dnabert_tiny: Dnabert, tmp_path):
    folder = hf_folder(dnabert_tiny, tmp_path / "hf", "bin")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        open_source(hf=str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="neither ESM-2"):
        open_source(hf=str(folder))


def test_metadata_and_onnx_metadata_props(dnabert_tiny: Dnabert):
    path = dnabert_tiny.export(attention="virnuc", fused=True)
    meta = json.loads((path.parent / "model.json").read_text())
    assert set(meta) == set(rust_struct_fields("ModelMetadata"))
    # The DNABERT-S config is the Rust ModelConfig without its ESM-2-only fields.
    assert set(meta["model"]) == set(CONFIG_FIELDS) - set(ESM2_ONLY_FIELDS)
    assert set(rust_struct_fields("ModelConfig")) == set(CONFIG_FIELDS)
    assert meta["family"] == meta["model"]["family"] == "dnabert_s"
    assert (meta["pooling"], meta["alphabet"]) == ("mean_all_tokens", [])
    tok = path.parent / meta["tokenizer"]["file"]
    assert meta["tokenizer"] == {
        "kind": "hf_tokenizers",
        "file": "tokenizer.json",
        "sha256": hashlib.sha256(tok.read_bytes()).hexdigest(),
    }
    assert meta["onnx_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props[METADATA_PROPS_KEY]) == {k: v for k, v in meta.items() if k != "onnx_sha256"}
    assert [o["name"] for o in meta["outputs"]] == ["mean", "hidden"]
    assert meta["outputs"][0]["shape"] == ["batch", "192"]


def test_cli_random_dnabert_with_layers_and_tokenizer(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_bytes(default_test_tokenizer().read_bytes() + b" ")  # a different file: its own sha256
    args = ["--random", "dnabert_s", "--seed", "3", "--layers", "1", "--attention", "masked"]
    assert export_main([*args, "--tokenizer", str(tok), "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a/model.json").read_text())
    assert meta["model"]["num_layers"] == 1 and meta["model"]["name"] == "dnabert_s"
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
    assert meta["source"] == {"kind": "random", "path": None, "sha256": None, "seed": 3}
    assert export_main([*args, "--layers", "0", "--out", str(tmp_path / "b")]) == 2
    assert (
        export_main(["--random", DNABERT_TINY, "--seed", "1", "--tokenizer", "/nonexistent", "--out", "x"])
        == 2
    )
    assert export_main(["--random", "esm2_t6_8M", "--seed", "1", "--tokenizer", str(tok), "--out", "x"]) == 2


# -- the test tokenizer ----------------------------------------------------------------------------------


def test_trained_tokenizer_is_deterministic_and_in_dnabert_s_format(tmp_path):
    from tokenizers import Tokenizer

    script = repo_root() / "tools" / "train_test_tokenizer.py"
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    spec = json.loads(outs[0].read_text())
    vocab = spec["model"]["vocab"]
    assert [vocab[t] for t in ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "A", "C", "G", "T"]] == list(
        range(9)
    )
    assert spec["normalizer"] is None and spec["pre_tokenizer"] == {"type": "Whitespace"}
    assert spec["truncation"]["max_length"] == 2000 and spec["padding"]["strategy"] == {"Fixed": 2000}
    assert 1000 < len(vocab) <= 4096
    tok = Tokenizer.from_file(str(outs[0]))
    tok.no_truncation()
    tok.no_padding()
    enc = tok.encode("acgtNRY")  # no normalizer: lowercase and IUPAC codes are one [UNK] each
    assert enc.ids == [1, *[0] * 7, 2]
    assert tok.encode("").ids == [1, 2]
    long = tok.encode("ACGT" * 3000).ids  # past 2000 tokens once truncation is off
    assert long[0] == 1 and long[-1] == 2 and len(long) > 2000 and 0 not in long


@pytest.mark.skipif(
    not REAL_TOKENIZER.exists(), reason=f"released DNABERT-S tokenizer not at {REAL_TOKENIZER}"
)
def test_trained_tokenizer_has_the_released_files_layout():
    ours = json.loads(default_test_tokenizer().read_text())
    real = json.loads(REAL_TOKENIZER.read_text())
    for key in (
        "truncation",
        "padding",
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ):
        assert ours[key] == real[key], key
    # Newer `tokenizers` write `ignore_merges: false` (the default), which the released file predates.
    model_keys = {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges", "ignore_merges")}
    assert ours["model"].get("ignore_merges", False) is False
    assert model_keys == {k: v for k, v in real["model"].items() if k not in ("vocab", "merges")}
    assert list(ours["model"]["vocab"])[:9] == list(real["model"]["vocab"])[:9]
