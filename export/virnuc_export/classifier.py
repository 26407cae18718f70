"""VirNucPro's classifier → `classifier.safetensors` + `classifier.json` for `virnuc-trt predict`.

VirNucPro (Li-Jing-1997/VirNucPro, `train.py`, `prediction.py`) classifies each stop-free frame from
`[DNABERT-S mean (768) | ESM-2 mean (H_esm)]` with `MLPClassifier`: `hidden_layer` Linear(in → 512) →
`bn1` BatchNorm1d(512) (eval: running statistics) → ReLU → `dropout` (a no-op in eval) →
`output_layer` Linear(512 → 2); softmax; class 0 `others`, 1 `virus`. Its released files
(`300_model.pth`, `500_model.pth`) are `torch.save(model)` pickles of the whole module, whose class is
`__main__.MLPClassifier`, possibly saved on a GPU.

Unpickling such a file with plain `torch.load` would run whatever the pickle names. Here it goes
through torch's weights-only unpickler (`weights_only=True`) with an allowlist of exactly the classes
a whole-module MLPClassifier pickle holds: the module itself (bound to a stand-in class with no code
of its own), `Linear`, `BatchNorm1d`, `Dropout` and `set`; tensors, storages and `OrderedDict` are
torch's own allowlist. Anything else in a pickle (`os.system`, another module, an unknown class) stops
the load before it is called. Also accepted: a state-dict `.pth` and a `.safetensors` file with the
same tensor names. Output (see export/README.md, *Classifier*): the six tensors in float32 safetensors
and JSON with dims, eps, labels and the source's sha256.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from . import __version__

FORMAT = "virnuc-trt-classifier/1"
DNABERT_DIM = 768
LABELS = ("others", "virus")
BN_EPS_DEFAULT = 1e-5
# Tensor names as VirNucPro's state dict has them, in the order they are applied.
TENSORS = (
    "hidden_layer.weight",
    "hidden_layer.bias",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "output_layer.weight",
    "output_layer.bias",
)
# Carried by a BatchNorm state dict; not needed in eval mode.
OPTIONAL = ("bn1.num_batches_tracked",)


class ClassifierError(ValueError):
    """A classifier file that cannot be used; the message names the file and the reason."""


class _PickledMLPClassifier(torch.nn.Module):
    """Stands in for VirNucPro's `__main__.MLPClassifier` while unpickling: no `__init__` runs
    (unpickling creates the object with `__new__` and sets its `__dict__`), and no method of it is
    called except `nn.Module`'s own."""


# Exactly what a `torch.save(model)` of MLPClassifier names besides torch's default allowlist.
_SAFE_GLOBALS: list[Any] = [
    (_PickledMLPClassifier, "__main__.MLPClassifier"),
    torch.nn.Linear,
    torch.nn.BatchNorm1d,
    torch.nn.Dropout,
    set,
]


@dataclass
class Classifier:
    """The MLP's tensors (float32, VirNucPro's names) and what the runtime needs to know."""

    tensors: dict[str, np.ndarray]
    eps: float
    source: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False

    @property
    def input_dim(self) -> int:
        return int(self.tensors["hidden_layer.weight"].shape[1])

    @property
    def hidden_dim(self) -> int:
        return int(self.tensors["hidden_layer.weight"].shape[0])

    @property
    def esm_dim(self) -> int:
        return self.input_dim - DNABERT_DIM

    def forward(self, features: np.ndarray) -> np.ndarray:
        """Probabilities [N, 2] in float64 (a reference; the runtime computes in float32)."""
        t = {k: v.astype(np.float64) for k, v in self.tensors.items()}
        h = features.astype(np.float64) @ t["hidden_layer.weight"].T + t["hidden_layer.bias"]
        h = (h - t["bn1.running_mean"]) / np.sqrt(t["bn1.running_var"] + self.eps) * t["bn1.weight"]
        h = np.maximum(h + t["bn1.bias"], 0.0)
        logits = h @ t["output_layer.weight"].T + t["output_layer.bias"]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tensors(tensors: dict[str, np.ndarray], where: str) -> None:
    """Names, shapes and values of an MLPClassifier: the dims must chain and the input must be
    768 (DNABERT-S) plus a positive ESM-2 width; two classes; variances positive; all finite."""
    missing = [k for k in TENSORS if k not in tensors]
    extra = [k for k in tensors if k not in TENSORS and k not in OPTIONAL]
    if missing or extra:
        raise ClassifierError(
            f"{where}: not a VirNucPro MLPClassifier: missing tensors {missing}, unexpected {extra} "
            f"(expected {list(TENSORS)})"
        )
    w1 = tensors["hidden_layer.weight"]
    if w1.ndim != 2:
        raise ClassifierError(f"{where}: hidden_layer.weight has shape {list(w1.shape)}, expected 2-D")
    hidden, input_dim = w1.shape
    if input_dim <= DNABERT_DIM:
        raise ClassifierError(
            f"{where}: input width {input_dim} is not {DNABERT_DIM} (DNABERT-S) plus an ESM-2 width"
        )
    want = {
        "hidden_layer.bias": (hidden,),
        "bn1.weight": (hidden,),
        "bn1.bias": (hidden,),
        "bn1.running_mean": (hidden,),
        "bn1.running_var": (hidden,),
        "output_layer.weight": (len(LABELS), hidden),
        "output_layer.bias": (len(LABELS),),
    }
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ClassifierError(
                f"{where}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)} "
                f"(hidden_layer.weight is {list(w1.shape)}; VirNucPro has 2 classes)"
            )
    for name in TENSORS:
        if not np.all(np.isfinite(tensors[name])):
            raise ClassifierError(f"{where}: {name} holds non-finite values")
    if np.any(tensors["bn1.running_var"] < 0):
        raise ClassifierError(f"{where}: bn1.running_var has negative entries")


def _as_float32(state: dict[str, torch.Tensor], where: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ClassifierError(f"{where}: {name} is a {type(t).__name__}, not a tensor")
        if name in OPTIONAL:
            continue
        if not t.is_floating_point():
            raise ClassifierError(f"{where}: {name} has dtype {t.dtype}, expected floating point")
        out[name] = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().copy()
    return out


def _from_module(obj: torch.nn.Module, where: str) -> tuple[dict[str, np.ndarray], float]:
    children = dict(obj.named_children())
    kinds = {
        "hidden_layer": torch.nn.Linear,
        "bn1": torch.nn.BatchNorm1d,
        "output_layer": torch.nn.Linear,
        "dropout": torch.nn.Dropout,
    }
    if set(children) != set(kinds) or any(not isinstance(children[k], c) for k, c in kinds.items()):
        found = {k: type(v).__name__ for k, v in children.items()}
        raise ClassifierError(
            f"{where}: the pickled MLPClassifier has submodules {found}, not VirNucPro's "
            f"hidden_layer (Linear), bn1 (BatchNorm1d), output_layer (Linear), dropout (Dropout)"
        )
    bn = children["bn1"]
    if not (bn.track_running_stats and bn.affine):
        raise ClassifierError(
            f"{where}: bn1 has track_running_stats={bn.track_running_stats}, affine={bn.affine}; "
            "VirNucPro's BatchNorm1d has both (eval mode uses the running statistics)"
        )
    if children["hidden_layer"].bias is None or children["output_layer"].bias is None:
        raise ClassifierError(f"{where}: a Linear layer has no bias; VirNucPro's have")
    return _as_float32(obj.state_dict(), where), float(bn.eps)


def _load_pickle(path: Path) -> Any:
    """torch's weights-only unpickler, with the MLPClassifier allowlist, on the CPU."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message names the refused global ("Unsupported global: GLOBAL os.system ...").
        first = str(e).split("\n\nCheck the documentation")[0]
        reason = next((line.strip() for line in first.splitlines() if "GLOBAL" in line), first[-300:])
        raise ClassifierError(
            f"{path}: refused: the file is a pickle that needs something besides VirNucPro's "
            f"MLPClassifier, its layers and tensors, so loading it could run code ({reason.strip()})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ClassifierError(f"{path}: not a PyTorch file this exporter can read: {e}") from None


def load(path: str | Path) -> Classifier:
    """A VirNucPro classifier from a whole-module `.pth`, a state-dict `.pth` or `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(16)
    source: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "seed": None}
    eps = BN_EPS_DEFAULT
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as e:  # the safetensors library raises its own error types
            raise ClassifierError(f"{path}: not a readable safetensors file: {e}") from None
        tensors = _as_float32(dict(state), str(path))
        source["kind"] = "safetensors"
    elif head.startswith(b"PK") or head[:1] == b"\x80":
        obj = _load_pickle(path)
        if isinstance(obj, _PickledMLPClassifier):
            tensors, eps = _from_module(obj, str(path))
            source["kind"] = "whole-module-pickle"
        elif isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
            tensors = _as_float32(OrderedDict(obj), str(path))
            source["kind"] = "state-dict"
        else:
            raise ClassifierError(
                f"{path}: holds a {type(obj).__name__}, neither VirNucPro's MLPClassifier nor its state dict"
            )
    else:
        raise ClassifierError(
            f"{path}: neither a PyTorch .pth (zip or legacy pickle) nor a .safetensors file"
        )
    check_tensors(tensors, str(path))
    return Classifier(tensors, eps, source)


def random_classifier(esm_dim: int, seed: int, hidden_dim: int = 512) -> Classifier:
    """Seeded random weights for tests and the demo, sized for `768 + esm_dim` features.

    Xavier-uniform Linear weights as VirNucPro's `init_weights`, biases 0.02·N(0, 1), and BatchNorm
    statistics away from the identity (running mean 0.1·N, variance U(0.5, 1.5), weight 1 + 0.1·N,
    bias 0.1·N), so that a dropped term shows in the comparisons."""
    if esm_dim <= 0 or hidden_dim <= 0:
        raise ClassifierError(f"--esm-dim {esm_dim} and --hidden-dim {hidden_dim} must be positive")
    rng = np.random.default_rng(seed)
    input_dim = DNABERT_DIM + esm_dim

    def xavier(fan_out: int, fan_in: int) -> np.ndarray:
        a = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-a, a, size=(fan_out, fan_in)).astype(np.float32)

    t = {
        "hidden_layer.weight": xavier(hidden_dim, input_dim),
        "hidden_layer.bias": (0.02 * rng.standard_normal(hidden_dim)).astype(np.float32),
        "bn1.weight": (1.0 + 0.1 * rng.standard_normal(hidden_dim)).astype(np.float32),
        "bn1.bias": (0.1 * rng.standard_normal(hidden_dim)).astype(np.float32),
        "bn1.running_mean": (0.1 * rng.standard_normal(hidden_dim)).astype(np.float32),
        "bn1.running_var": rng.uniform(0.5, 1.5, size=hidden_dim).astype(np.float32),
        "output_layer.weight": xavier(len(LABELS), hidden_dim),
        "output_layer.bias": (0.02 * rng.standard_normal(len(LABELS))).astype(np.float32),
    }
    source = {"kind": "random", "path": None, "sha256": None, "seed": seed}
    return Classifier(t, BN_EPS_DEFAULT, source, random_weights=True)


def write(classifier: Classifier, out_dir: str | Path) -> tuple[Path, Path]:
    """DIR/classifier.safetensors (float32, VirNucPro's names) and DIR/classifier.json."""
    check_tensors(classifier.tensors, "classifier")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = out / "classifier.safetensors"
    save_file({k: np.ascontiguousarray(classifier.tensors[k], dtype=np.float32) for k in TENSORS}, str(st))
    meta = {
        "format": FORMAT,
        "input_dim": classifier.input_dim,
        "dnabert_dim": DNABERT_DIM,
        "esm_dim": classifier.esm_dim,
        "hidden_dim": classifier.hidden_dim,
        "num_classes": len(LABELS),
        "labels": list(LABELS),
        "feature_order": ["dnabert_s_mean", "esm2_mean"],
        "batch_norm_eps": classifier.eps,
        "tensors": {k: list(classifier.tensors[k].shape) for k in TENSORS},
        "source": {
            "kind": classifier.source.get("kind", "random"),
            "path": classifier.source.get("path"),
            "sha256": classifier.source.get("sha256"),
            "seed": classifier.source.get("seed"),
        },
        "random_weights": classifier.random_weights,
        "exporter_version": __version__,
        "safetensors_sha256": sha256_file(st),
    }
    js = out / "classifier.json"
    js.write_text(json.dumps(meta, indent=2) + "\n")
    return st, js
