"""model.json against the Rust `ModelMetadata` contract, the CLIs, external data, random weights."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnx
import pytest

from export_helpers import TINY, Model, pack, random_protein, run, session
from virnuc_export.__main__ import main as export_main
from virnuc_export.config import ALPHABET, CONFIG_FIELDS, repo_root, tokenize
from virnuc_export.export import METADATA_PROPS_KEY, export
from virnuc_export.graph import GraphOptions
from virnuc_export.reference import main as reference_main
from virnuc_export.weights import RandomWeights, canonical_names

ONNX_DTYPES = {
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.FLOAT: "float32",
}


def rust_struct_fields(name: str) -> list[str]:
    """Field names of a `pub struct` in runtime/core/src/lib.rs (the contract with the Rust side)."""
    text = (repo_root() / "runtime/core/src/lib.rs").read_text()
    body = re.search(rf"pub struct {name} \{{(.*?)\n\}}", text, re.S)
    assert body, name
    return re.findall(r"^\s*pub (\w+):", body.group(1), re.M)


def test_metadata_matches_rust_struct_and_graph(tiny: Model):
    path = tiny.export(attention="virnuc", fused=True)
    meta = json.loads((path.parent / "model.json").read_text())
    # Field sets, not order: JSON key order carries no meaning for serde.
    assert set(meta) == set(rust_struct_fields("ModelMetadata"))
    assert set(meta["model"]) == set(rust_struct_fields("ModelConfig")) == set(CONFIG_FIELDS)
    assert set(meta["source"]) == set(rust_struct_fields("ModelSource"))
    for spec in meta["inputs"] + meta["outputs"]:
        assert set(spec) == set(rust_struct_fields("TensorSpec"))
    assert meta["format"] == "virnuc-trt-onnx/1"
    assert meta["family"] == meta["model"]["family"] == "esm2"
    assert meta["tokenizer"] == {"kind": "esm2_alphabet"} and meta["pooling"] == "mean_residues"
    assert meta["alphabet"] == ALPHABET and len(ALPHABET) == 33 and ALPHABET[32] == "<mask>"
    assert (meta["attention"], meta["fused"], meta["precision"]) == ("virnuc", True, "fp32")
    assert meta["repr_layer"] == tiny.source.config["num_layers"]
    assert meta["source"] == {"kind": "random", "path": None, "sha256": None, "seed": 3}
    assert meta["random_weights"] is True
    assert meta["onnx_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model = onnx.load(path)
    # The graph carries model.json itself (less its own hash), so that edits of model.json are detected.
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props[METADATA_PROPS_KEY]) == {k: v for k, v in meta.items() if k != "onnx_sha256"}
    assert list(json.loads(props[METADATA_PROPS_KEY])) == list(meta)[:-1]
    graph_io = [
        [{"name": v.name, "dtype": ONNX_DTYPES[v.type.tensor_type.elem_type],
          "shape": [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]} for v in vs]
        for vs in (model.graph.input, model.graph.output)
    ]  # fmt: skip
    assert graph_io == [meta["inputs"], meta["outputs"]]
    assert [o["name"] for o in meta["outputs"]] == ["mean", "hidden"]


def test_cli_defaults_and_fp16_metadata(tmp_path):
    assert (
        export_main(["--random", TINY, "--seed", "1", "--attention", "masked", "--out", str(tmp_path / "m")])
        == 0
    )
    meta = json.loads((tmp_path / "m/model.json").read_text())
    assert meta["fused"] is False and [o["name"] for o in meta["outputs"]] == ["mean"]
    args = [
        "--random",
        TINY,
        "--seed",
        "1",
        "--precision",
        "fp16",
        "--repr-layer",
        "1",
        "--out",
        str(tmp_path / "v"),
    ]
    assert export_main(args) == 0
    meta = json.loads((tmp_path / "v/model.json").read_text())
    assert (meta["attention"], meta["fused"], meta["precision"], meta["repr_layer"]) == (
        "virnuc",
        True,
        "fp16",
        1,
    )
    weights = [t for t in onnx.load(tmp_path / "v/model.onnx").graph.initializer if t.name.endswith(".w")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert export_main(["--random", TINY, "--out", str(tmp_path / "x")]) == 2  # --random needs --seed
    with pytest.raises(ValueError, match="repr_layer"):
        export(RandomWeights(TINY, 1), GraphOptions(repr_layer=5), tmp_path / "bad")


def test_external_data_gives_same_results(tiny: Model, tmp_path):
    options = GraphOptions(attention="masked", fused=True, per_token=True)
    result = export(tiny.source, options, tmp_path / "ext", external_data="always")
    assert result.data_path is not None and result.data_path.stat().st_size > 100_000
    assert result.onnx_path.stat().st_size < 200_000
    feeds = pack([tokenize("MKVLAAGIW"), tokenize("PEPTIDE")])
    embedded = run(session(tiny.export(attention="masked", fused=True)), feeds)
    external = run(session(result.onnx_path), feeds)
    np.testing.assert_array_equal(embedded["hidden"], external["hidden"])


def test_random_weights_are_deterministic_and_all_random():
    a, b, c = RandomWeights(TINY, 1), RandomWeights(TINY, 1), RandomWeights(TINY, 2)
    names = [n for n, _ in canonical_names(a.config)]
    for name in reversed(names):  # order of requests does not matter
        np.testing.assert_array_equal(a.get(name), b.get(name))
    for name in names:
        x = a.get(name)
        assert np.all(x != 0), name  # every parameter random: no zero biases
        assert not np.array_equal(x, c.get(name)), name
        if "LayerNorm.weight" in name or "emb_layer_norm_after.weight" in name:
            assert abs(x.mean() - 1) < 0.1 and x.std() > 0.05, name


def test_reference_cli_writes_npz_the_runtime_can_use(tiny: Model, tmp_path):
    rng = np.random.default_rng(41)
    seqs = [("a", random_protein(rng, 12)), ("b", "mkv"), ("c", random_protein(rng, 40))]
    fasta = tmp_path / "p.fa"
    fasta.write_text("".join(f">{i} description\n{s[:20]}\n{s[20:]}\n" for i, s in seqs))
    out = tmp_path / "ref.npz"
    args = ["--random", TINY, "--seed", "3", "--fasta", str(fasta), "--out", str(out), "--per-token"]
    assert reference_main(args) == 0
    ref = np.load(out)
    assert ref["ids"].tolist() == ["a", "b", "c"]
    assert ref["lengths"].tolist() == [12, 3, 40]
    assert ref["input_ids"][ref["cu_seqlens"][1] : ref["cu_seqlens"][2]].tolist() == tokenize("MKV")
    feeds = pack([tokenize(s) for _, s in seqs])
    np.testing.assert_array_equal(feeds["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(feeds["cu_seqlens"], ref["cu_seqlens"])
    got = run(session(tiny.export(attention="masked")), feeds)
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["hidden"], ref["hidden"], rtol=1e-4, atol=1e-4)
    assert reference_main([*args[:-1], "--float64", "--out", str(tmp_path / "r64.npz")]) == 0
    r64 = np.load(tmp_path / "r64.npz")
    assert r64["mean"].dtype == np.float64
    np.testing.assert_allclose(r64["mean"], ref["mean"], rtol=1e-4, atol=1e-5)
