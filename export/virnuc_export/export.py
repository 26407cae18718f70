"""Export driver: weight source + options → DIR/model.onnx (+ model.onnx.data) + DIR/model.json (+ the
DNABERT-S tokenizer.json)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from . import __version__
from .config import ALPHABET
from .graph import EsmGraph, GraphOptions, InitializerStore
from .graph_base import PackedGraph
from .graph_dnabert import DnabertGraph
from .weights import WeightSource, canonical_names, canonical_shape

FORMAT = "virnuc-trt-onnx/1"
# Key of the ONNX model's own `metadata_props` entry that carries model.json (less `onnx_sha256`), so that
# a runtime can check that model.json describes this very graph.
METADATA_PROPS_KEY = "virnuc.metadata"
GRAPHS: dict[str, type[PackedGraph]] = {"esm2": EsmGraph, "dnabert_s": DnabertGraph}
POOLING = {family: graph.pooling for family, graph in GRAPHS.items()}
# Protobuf cannot hold more than 2 GiB; above this many weight bytes the tensors go to model.onnx.data.
EXTERNAL_THRESHOLD = 1 << 30
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class ExportResult:
    onnx_path: Path
    metadata_path: Path
    data_path: Path | None
    metadata: dict[str, Any]
    seconds: float


def weight_bytes(source: WeightSource, precision: str) -> int:
    per = 2 if precision == "fp16" else 4
    total = 0
    for name, _ in canonical_names(source.config):
        n = 1
        for dim in canonical_shape(source.config, name):
            n *= dim
        total += n * per
    return total


def tensor_specs(options: GraphOptions, hidden: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["total_tokens"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["total_tokens"]},
        {"name": "cu_seqlens", "dtype": "int32", "shape": ["batch_plus_1"]},
    ]
    outputs = [{"name": "mean", "dtype": "float32", "shape": ["batch", str(hidden)]}]
    if options.per_token:
        outputs.append({"name": "hidden", "dtype": "float32", "shape": ["total_tokens", str(hidden)]})
    return inputs, outputs


def metadata_props_text(metadata: dict[str, Any]) -> str:
    """The `virnuc.metadata` value: model.json's fields except `onnx_sha256`, as compact JSON in
    model.json's key order."""
    return json.dumps({k: v for k, v in metadata.items() if k != "onnx_sha256"}, separators=(",", ":"))


def tokenizer_metadata(source: WeightSource, out: Path) -> dict[str, Any]:
    """ESM-2: the fixed alphabet. DNABERT-S: the source's tokenizer.json, copied byte for byte beside the
    graph (file name relative to the export folder) with its sha256."""
    if source.config["family"] == "esm2":
        return {"kind": "esm2_alphabet"}
    tokenizer = source.tokenizer_file()
    if tokenizer is None:
        raise ValueError(f"{source.path or source.kind}: no tokenizer.json for a DNABERT-S export")
    data = Path(tokenizer).read_bytes()
    (out / TOKENIZER_FILE).write_bytes(data)
    return {"kind": "hf_tokenizers", "file": TOKENIZER_FILE, "sha256": hashlib.sha256(data).hexdigest()}


def export(
    source: WeightSource, options: GraphOptions, out_dir: str | Path, external_data: str = "auto"
) -> ExportResult:
    """Writes the graph and its metadata; returns their paths and the metadata dict."""
    start = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    data_path = out / "model.onnx.data"
    if external_data not in ("auto", "always", "never"):
        raise ValueError("external_data must be auto, always or never")
    use_external = external_data == "always" or (
        external_data == "auto" and weight_bytes(source, options.precision) > EXTERNAL_THRESHOLD
    )
    if data_path.exists():
        data_path.unlink()
    store = InitializerStore(data_path if use_external else None)
    try:
        model = GRAPHS[source.config["family"]](source, options, store).build()
    finally:
        store.close()
    inputs, outputs = tensor_specs(options, source.config["hidden_size"])
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "family": source.config["family"],
        "model": dict(source.config),
        "tokenizer": tokenizer_metadata(source, out),
        "alphabet": list(ALPHABET) if source.config["family"] == "esm2" else [],
        "pooling": POOLING[source.config["family"]],
        "attention": options.attention,
        "fused": bool(options.fused),
        "precision": options.precision,
        "repr_layer": int(source.config["num_layers"] if options.repr_layer is None else options.repr_layer),
        "inputs": inputs,
        "outputs": outputs,
        "source": {
            "kind": source.kind,
            "path": source.path,
            "sha256": source.checkpoint_sha256(),
            "seed": source.seed,
        },
        "random_weights": source.kind == "random",
        "exporter_version": __version__,
    }
    onnx.helper.set_model_props(model, {METADATA_PROPS_KEY: metadata_props_text(metadata)})
    onnx.save_model(model, str(onnx_path))
    del model
    onnx.checker.check_model(str(onnx_path))
    metadata["onnx_sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    metadata_path = out / "model.json"
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return ExportResult(
        onnx_path, metadata_path, data_path if use_external else None, metadata, time.monotonic() - start
    )
