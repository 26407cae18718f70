"""Both checkpoint formats: a small HF folder (save_pretrained) and a small fair-esm `.pt`, each exported
and compared with the implementation that owns the format (HF from_pretrained, fair-esm's own forward)."""

from __future__ import annotations

import argparse
import sys

import esm
import numpy as np
import pytest
import torch
from transformers import EsmForMaskedLM, EsmModel

from export_helpers import TINY, cosine, pack, random_protein, residue_mean, run, session, token_rel_error
from virnuc_export.config import tokenize
from virnuc_export.export import export
from virnuc_export.graph import GraphOptions
from virnuc_export.reference import embed_one, hf_config, hf_model_from_folder
from virnuc_export.weights import FairEsmWeights, HfWeights, RandomWeights, open_source

MAX_REL, MIN_COS = 1e-4, 0.99999


def tokens_for_test(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [tokenize(random_protein(rng, n)) for n in (1, 7, 64, 150)]


def check_against(reference_states: list[np.ndarray], out: dict[str, np.ndarray], tokens: list[list[int]]):
    cu = np.cumsum([0] + [len(t) for t in tokens])
    for i, ref in enumerate(reference_states):
        assert token_rel_error(out["hidden"][cu[i] : cu[i + 1]], ref) <= MAX_REL
        assert cosine(out["mean"][i], residue_mean(ref)) >= MIN_COS


@pytest.mark.parametrize("fmt", ["safetensors-maskedlm", "bin-model", "no-token-dropout"])
def test_hf_folder_exports_and_matches_from_pretrained(tmp_path, fmt: str):
    src = RandomWeights(TINY, 21)
    config = dict(src.config)
    if fmt == "no-token-dropout":  # HF `token_dropout: false`: no 0.88 rescale in HF, none in the graph
        config["token_dropout_scale"] = 1.0
    if fmt == "bin-model":
        model = EsmModel(hf_config(config), add_pooling_layer=False)
        target = model
    else:
        model = EsmForMaskedLM(hf_config(config))  # real HF checkpoints: esm. prefix + lm_head
        target = model.esm
    target.load_state_dict({k: torch.from_numpy(v) for k, v in src.items()}, strict=False)
    folder = tmp_path / "hf"
    model.save_pretrained(folder, safe_serialization=fmt != "bin-model")
    assert (folder / ("pytorch_model.bin" if fmt == "bin-model" else "model.safetensors")).exists()

    loaded = HfWeights(folder)
    for name, value in src.items():
        np.testing.assert_array_equal(loaded.get(name), value, err_msg=name)
    result = export(loaded, GraphOptions(attention="masked", per_token=True), tmp_path / "out")
    meta = result.metadata
    assert meta["source"]["kind"] == "hf" and meta["random_weights"] is False
    assert len(meta["source"]["sha256"]) == 64
    assert meta["model"]["token_dropout_scale"] == config["token_dropout_scale"]

    hf = hf_model_from_folder(str(folder))  # HF's own loader, not ours
    tokens = tokens_for_test(1)
    refs = [embed_one(hf, t, None, torch.float32) for t in tokens]
    check_against(refs, run(session(result.onnx_path), pack(tokens)), tokens)


def random_fair_esm(seed: int) -> esm.model.esm2.ESM2:
    torch.manual_seed(seed)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(
        num_layers=2, embed_dim=64, attention_heads=4, alphabet=alphabet, token_dropout=True
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5 if "embed" not in name else 1.0))
    return model.eval()


def write_fair_esm_checkpoint(model: esm.model.esm2.ESM2, path) -> None:
    """The layout of fair-esm's released ESM-2 files: prefixed state dict + cfg, regression weights apart."""
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("contact_head.regression"):
            continue
        state[("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k] = v
    cfg = argparse.Namespace(
        encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4, token_dropout=True
    )
    torch.save({"model": state, "cfg": {"model": cfg}}, path)
    regression = {k: v for k, v in model.state_dict().items() if k.startswith("contact_head.regression")}
    torch.save({"model": regression}, str(path.with_suffix("")) + "-contact-regression.pt")


def test_fair_esm_checkpoint_exports_and_matches_fair_esm_forward(tmp_path):
    model = random_fair_esm(5)
    path = tmp_path / "esm2_t2_tiny.pt"
    write_fair_esm_checkpoint(model, path)

    # fair-esm's own loader reads the file we wrote (so the file is a real fair-esm checkpoint).
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded_model, alphabet = esm.pretrained.load_model_and_alphabet_local(path)
    loaded_model.eval()

    src = open_source(fair_esm=str(path))
    assert isinstance(src, FairEsmWeights)
    assert (src.config["num_layers"], src.config["hidden_size"], src.config["num_heads"]) == (2, 64, 4)
    tokens = tokens_for_test(2)
    for repr_layer in (2, 1):
        result = export(
            src,
            GraphOptions(attention="masked", per_token=True, repr_layer=repr_layer),
            tmp_path / f"o{repr_layer}",
        )
        assert result.metadata["source"]["kind"] == "fair-esm"
        out = run(session(result.onnx_path), pack(tokens))
        refs = []
        for t in tokens:
            with torch.no_grad():
                r = loaded_model(torch.tensor([t]), repr_layers=[repr_layer])["representations"][repr_layer]
            refs.append(r[0].numpy())
        check_against(refs, out, tokens)
    # fair-esm's batch converter gives the same tokens as ours.
    _, _, batch = alphabet.get_batch_converter()([("s", "MKVLAX")])
    assert batch[0].tolist() == tokenize("MKVLAX")


def test_fair_esm_and_hf_names_agree(tmp_path):
    """The same weights through the fair-esm and the HF path give the same canonical tensors."""
    model = random_fair_esm(6)
    path = tmp_path / "esm2_t2_x.pt"
    write_fair_esm_checkpoint(model, path)
    src = FairEsmWeights(path)
    sd = model.state_dict()
    np.testing.assert_array_equal(
        src.get("encoder.layer.1.attention.self.key.bias"), sd["layers.1.self_attn.k_proj.bias"]
    )
    np.testing.assert_array_equal(
        src.get("encoder.layer.0.LayerNorm.weight"), sd["layers.0.final_layer_norm.weight"]
    )
    np.testing.assert_array_equal(
        src.get("encoder.emb_layer_norm_after.bias"), sd["emb_layer_norm_after.bias"]
    )


def test_fair_esm_config_class_from_a_missing_package(tmp_path, monkeypatch):
    """Released checkpoints pickle their cfg with the training framework's classes (omegaconf/fairseq);
    loading must not need those packages installed."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "fakecfg.py").write_text(
        "class ModelCfg:\n    def __init__(self, **kw):\n        self.__dict__.update(kw)\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    import fakecfg

    model = random_fair_esm(7)
    path = tmp_path / "esm2_t2_cfgclass.pt"
    state = {"encoder.sentence_encoder." + k: v for k, v in model.state_dict().items()}
    cfg = fakecfg.ModelCfg(encoder_layers=2, encoder_attention_heads=4, token_dropout=True)
    torch.save({"model": state, "cfg": {"model": cfg}}, path)
    monkeypatch.delitem(sys.modules, "fakecfg")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(pkg)])
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)  # what a plain load does without the package
    src = FairEsmWeights(path)
    assert src.config["num_heads"] == 4
    embed = src.get("embeddings.word_embeddings.weight")
    np.testing.assert_array_equal(embed, model.embed_tokens.weight.detach().numpy())


def test_safetensors_reader_dtypes(tmp_path):
    """Our plain-read safetensors loader (no memory map) against the safetensors library's writer."""
    from safetensors.torch import save_file

    from virnuc_export.weights import safetensors_index

    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "empty": torch.zeros(0),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    index = safetensors_index(tmp_path / "m.safetensors")
    assert sorted(index) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(index[name]().astype(np.float32), t.float().numpy())
