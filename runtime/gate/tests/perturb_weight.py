"""Test helper for the gate: replaces one weight of an exported graph with fresh random values of the same
shape, dtype and scale, and updates model.json's onnx_sha256 — a model that differs from its source in one
tensor only, which the accuracy gate must refuse.

Usage: python perturb_weight.py MODEL_DIR [--initializer l3.fc2.w] [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def perturb(model_dir: Path, initializer: str, seed: int) -> None:
    onnx_path = model_dir / "model.onnx"
    model = onnx.load(str(onnx_path))
    for init in model.graph.initializer:
        if init.name == initializer:
            w = numpy_helper.to_array(init)
            rng = np.random.default_rng(seed)
            fresh = rng.standard_normal(w.shape) * float(w.astype(np.float64).std())
            init.CopyFrom(numpy_helper.from_array(fresh.astype(w.dtype), init.name))
            break
    else:
        names = ", ".join(i.name for i in model.graph.initializer[:20])
        raise SystemExit(f"{onnx_path}: no initializer {initializer} (first ones: {names})")
    onnx.save_model(model, str(onnx_path))
    meta_path = model_dir / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["onnx_sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--initializer", default="l3.fc2.w")
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args()
    perturb(args.model_dir, args.initializer, args.seed)


if __name__ == "__main__":
    main()
