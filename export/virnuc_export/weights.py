"""Weights from any source, in one canonical form per family — ESM-2: HF `EsmModel` state-dict names (no
`esm.` prefix); DNABERT-S: MosaicBERT `BertModel` names (no `bert.` prefix) — as float32 numpy arrays,
produced one tensor at a time so that big models stream through the exporter.

Sources: a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin; ESM-2 or
DNABERT-S/DNABERT-2, told apart by config.json), a fair-esm `.pt` checkpoint, or seeded random weights
for a `models/*.yaml` config.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import config_for_architecture, family_configs, load_model_config, validate_config

_LAYER_PARAMS: tuple[tuple[str, str], ...] = (
    # (canonical suffix under encoder.layer.{i}., kind) — kind picks the random init.
    ("attention.LayerNorm.weight", "ln_weight"),
    ("attention.LayerNorm.bias", "bias"),
    ("attention.self.query.weight", "matrix"),
    ("attention.self.query.bias", "bias"),
    ("attention.self.key.weight", "matrix"),
    ("attention.self.key.bias", "bias"),
    ("attention.self.value.weight", "matrix"),
    ("attention.self.value.bias", "bias"),
    ("attention.output.dense.weight", "matrix"),
    ("attention.output.dense.bias", "bias"),
    ("LayerNorm.weight", "ln_weight"),
    ("LayerNorm.bias", "bias"),
    ("intermediate.dense.weight", "matrix"),
    ("intermediate.dense.bias", "bias"),
    ("output.dense.weight", "matrix"),
    ("output.dense.bias", "bias"),
)


_DNABERT_LAYER_PARAMS: tuple[tuple[str, str], ...] = (
    # `BertModel` (MosaicBERT, bert_layers.py) names under encoder.layer.{i}.
    ("attention.self.Wqkv.weight", "matrix"),
    ("attention.self.Wqkv.bias", "bias"),
    ("attention.output.dense.weight", "matrix"),
    ("attention.output.dense.bias", "bias"),
    ("attention.output.LayerNorm.weight", "ln_weight"),
    ("attention.output.LayerNorm.bias", "bias"),
    ("mlp.gated_layers.weight", "matrix"),
    ("mlp.wo.weight", "matrix"),
    ("mlp.wo.bias", "bias"),
    ("mlp.layernorm.weight", "ln_weight"),
    ("mlp.layernorm.bias", "bias"),
)
# DNABERT-S: token type 0 is the only one used, but the checkpoint holds type_vocab_size (2) rows.
DNABERT_TYPE_VOCAB = 2


def canonical_names(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Every parameter the packed graph needs, with its init kind, in a fixed order."""
    if config["family"] == "dnabert_s":
        names = [
            ("embeddings.word_embeddings.weight", "embedding"),
            ("embeddings.token_type_embeddings.weight", "embedding"),
            ("embeddings.LayerNorm.weight", "ln_weight"),
            ("embeddings.LayerNorm.bias", "bias"),
        ]
        for i in range(config["num_layers"]):
            names += [(f"encoder.layer.{i}.{suffix}", kind) for suffix, kind in _DNABERT_LAYER_PARAMS]
        return names
    names = [("embeddings.word_embeddings.weight", "embedding")]
    for i in range(config["num_layers"]):
        names += [(f"encoder.layer.{i}.{suffix}", kind) for suffix, kind in _LAYER_PARAMS]
    names += [
        ("encoder.emb_layer_norm_after.weight", "ln_weight"),
        ("encoder.emb_layer_norm_after.bias", "bias"),
    ]
    return names


def canonical_shape(config: dict[str, Any], name: str) -> tuple[int, ...]:
    h, f, v = config["hidden_size"], config["ffn_size"], config["vocab_size"]
    if name == "embeddings.word_embeddings.weight":
        return (v, h)
    if config["family"] == "dnabert_s":
        shapes = {
            "embeddings.token_type_embeddings.weight": (DNABERT_TYPE_VOCAB, h),
            "attention.self.Wqkv.weight": (3 * h, h),
            "attention.self.Wqkv.bias": (3 * h,),
            "attention.output.dense.weight": (h, h),
            "mlp.gated_layers.weight": (2 * f, h),
            "mlp.wo.weight": (h, f),
        }
        for suffix, shape in shapes.items():
            if name.endswith(suffix):
                return shape
        return (h,)
    if name.endswith("intermediate.dense.weight"):
        return (f, h)
    if name.endswith("intermediate.dense.bias"):
        return (f,)
    if name.endswith("output.dense.weight") and not name.endswith("attention.output.dense.weight"):
        return (h, f)
    if name.endswith(".weight") and ("query" in name or "key" in name or "value" in name or "dense" in name):
        return (h, h)
    return (h,)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class WeightSource:
    """A model config plus a lazy `get(name)` of float32 canonical tensors."""

    kind: str = ""
    config: dict[str, Any]
    path: str | None = None
    seed: int | None = None

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def checkpoint_sha256(self) -> str | None:
        return None

    def tokenizer_file(self) -> Path | None:
        """The tokenizer.json that goes with the weights (DNABERT-S); None for ESM-2's fixed alphabet."""
        return None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, _ in canonical_names(self.config):
            yield name, self.get(name)

    def state_dict(self) -> dict[str, np.ndarray]:
        """All tensors at once (for the reference and small models only)."""
        return dict(self.items())


class RandomWeights(WeightSource):
    """Seeded random weights in which every parameter is random, so that a bias or layer-norm bug shows.

    Each tensor has its own generator seeded by (seed, crc32(name)): the values do not depend on the order
    tensors are asked for. Matrices: zero-mean uniform noise of variance 1/fan_in (attention logits of
    order 1; uniform because it is generated 3 times faster than normal noise, which matters for the 3B/15B
    exports); embeddings: uniform of variance 1; biases 0.02·N(0, 1); layer-norm weights 1 + 0.1·N(0, 1).
    """

    kind = "random"

    def __init__(
        self, config_name: str, seed: int, layers: int | None = None, tokenizer: str | Path | None = None
    ) -> None:
        self.config = load_model_config(config_name)
        if layers is not None:
            # Fewer (or more) layers of the same architecture, for tests; the tensors of layer i do not
            # depend on the layer count (each is seeded by its own name).
            if not 1 <= layers <= 1000:
                raise ValueError(f"--layers {layers} outside 1..1000")
            self.config["num_layers"] = int(layers)
        self.path = None
        self.seed = int(seed)
        self._kinds = dict(canonical_names(self.config))
        self._tokenizer = Path(tokenizer) if tokenizer is not None else None
        if self._tokenizer is not None and self.config["family"] != "dnabert_s":
            raise ValueError("--tokenizer is for DNABERT-S configs (ESM-2 has a fixed alphabet)")
        if self._tokenizer is not None and not self._tokenizer.is_file():
            raise FileNotFoundError(f"tokenizer {self._tokenizer} does not exist")

    def tokenizer_file(self) -> Path | None:
        if self.config["family"] != "dnabert_s":
            return None
        if self._tokenizer is None:
            # The project's test tokenizer, trained on the committed lambda genome (deterministic).
            from .dna_tokenizer import default_test_tokenizer

            self._tokenizer = default_test_tokenizer()
        return self._tokenizer

    def get(self, name: str) -> np.ndarray:
        kind = self._kinds[name]
        shape = canonical_shape(self.config, name)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        if kind in ("matrix", "embedding"):
            # U(-a, a) has variance a²/3.
            a = np.float32(np.sqrt(3.0 / shape[1]) if kind == "matrix" else np.sqrt(3.0))
            x = rng.random(shape, dtype=np.float32)
            x *= np.float32(2.0) * a
            x -= a
            return x
        x = rng.standard_normal(shape, dtype=np.float32)
        if kind == "bias":
            x *= np.float32(0.02)
        elif kind == "ln_weight":
            x *= np.float32(0.1)
            x += np.float32(1.0)
        return x


def _to_numpy(t: Any) -> np.ndarray:
    """numpy array or torch tensor (any float dtype) → float32 numpy."""
    if isinstance(t, np.ndarray):
        return t.astype(np.float32, copy=False)
    import torch

    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float32).cpu().numpy()
    return np.asarray(t, dtype=np.float32)


class _TensorMapSource(WeightSource):
    """Canonical names looked up in a mapping of checkpoint tensors (lazy: safetensors or mmap'd torch)."""

    def __init__(self) -> None:
        self._lookup: dict[str, Any] = {}
        self._files: list[Path] = []
        self._shapes: dict[str, tuple[int, ...]] = {}  # where the checkpoint's shape is the reference

    def get(self, name: str) -> np.ndarray:
        if name not in self._lookup:
            raise KeyError(f"{self.path}: checkpoint has no tensor for {name}")
        value = self._lookup[name]
        arr = _to_numpy(value() if callable(value) else value)
        want = self._shapes.get(name) or canonical_shape(self.config, name)
        if arr.shape != want:
            raise ValueError(f"{self.path}: {name} has shape {arr.shape}, expected {want}")
        return arr

    def checkpoint_sha256(self) -> str | None:
        if not self._files:
            return None
        if len(self._files) == 1:
            return sha256_file(self._files[0])
        # Several files: sha256 over "name sha256" lines, sorted (stable, and says which file changed).
        lines = sorted(f"{p.name} {sha256_file(p)}" for p in self._files)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class HfWeights(_TensorMapSource):
    """A Hugging Face ESM-2 folder: config.json + model.safetensors (one or sharded) or pytorch_model.bin."""

    kind = "hf"

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        folder = Path(folder)
        self.path = str(folder)
        with (folder / "config.json").open() as f:
            hf = json.load(f)
        if hf.get("position_embedding_type", "absolute") != "rotary" or hf.get("emb_layer_norm_before"):
            raise ValueError(
                f"{folder}: not an ESM-2 config (needs rotary positions, no emb_layer_norm_before)"
            )
        self.config = config_for_architecture(
            hf["num_hidden_layers"],
            hf["hidden_size"],
            hf["num_attention_heads"],
            hf["intermediate_size"],
            hf.get("layer_norm_eps", 1e-5),
            bool(hf.get("token_dropout", False)),
        )
        if hf.get("mask_token_id", 32) != 32 or hf.get("vocab_size", 33) != 33:
            raise ValueError(f"{folder}: vocabulary differs from the ESM-2 alphabet")
        raw, self._files = read_hf_weights(folder)
        for key, value in raw.items():
            name = key[len("esm.") :] if key.startswith("esm.") else key
            self._lookup[name] = value


def read_hf_weights(folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """Lazy tensors of an HF folder: model*.safetensors (one or sharded), else pytorch_model*.bin."""
    raw: dict[str, Any] = {}
    st = sorted(folder.glob("model*.safetensors"))
    if st:
        for p in st:
            raw.update(safetensors_index(p))
        return raw, st
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    import torch

    for p in bins:
        raw.update(torch.load(p, map_location="cpu", mmap=True, weights_only=True))
    return raw, bins


def hf_family(folder: Path, hf: dict[str, Any]) -> str:
    """The family of an HF folder's config.json: ESM-2 (`model_type` esm, rotary) or DNABERT-S/DNABERT-2
    (MosaicBERT `bert` config with its remote code `bert_layers.BertModel` or `alibi_starting_size`)."""
    if hf.get("model_type") == "esm" or hf.get("position_embedding_type") == "rotary":
        return "esm2"
    auto_map = hf.get("auto_map") or {}
    mosaic = "alibi_starting_size" in hf or any("bert_layers" in str(v) for v in auto_map.values())
    if hf.get("model_type") == "bert" and mosaic:
        return "dnabert_s"
    raise ValueError(
        f"{folder}/config.json: neither ESM-2 (model_type esm, rotary positions) nor DNABERT-S/DNABERT-2 "
        f"(model_type bert with MosaicBERT's bert_layers code or alibi_starting_size); "
        f"model_type is {hf.get('model_type')!r}"
    )


def dnabert_config_for_architecture(
    num_layers: int, hidden_size: int, num_heads: int, ffn_size: int, vocab_size: int, layer_norm_eps: float
) -> dict[str, Any]:
    """The models/*.yaml DNABERT-S entry with this architecture (DNABERT-2-117M has the same one and gets
    the same entry; the source sha256 tells the checkpoints apart), or a custom config named after it."""
    for c in family_configs("dnabert_s"):
        arch = (c["num_layers"], c["hidden_size"], c["num_heads"], c["ffn_size"], c["vocab_size"])
        if arch == (num_layers, hidden_size, num_heads, ffn_size, vocab_size):
            c["layer_norm_eps"] = float(layer_norm_eps)
            return c
    return validate_config(
        {
            "name": f"dnabert_s_custom_t{num_layers}_h{hidden_size}",
            "family": "dnabert_s",
            "checkpoint": "",
            "hf_repo": "",
            "num_layers": num_layers,
            "hidden_size": hidden_size,
            "num_heads": num_heads,
            "ffn_size": ffn_size,
            "vocab_size": vocab_size,
            "layer_norm_eps": layer_norm_eps,
        }
    )


class DnabertHfWeights(_TensorMapSource):
    """A DNABERT-S / DNABERT-2 folder: config.json (MosaicBERT `BertConfig`), model.safetensors or
    pytorch_model.bin with `BertModel` state-dict names (a `bert.` prefix, as `BertForMaskedLM` saves,
    is accepted; pooler and MLM head are not used), and tokenizer.json."""

    kind = "hf"

    def __init__(self, folder: str | Path, hf: dict[str, Any] | None = None) -> None:
        super().__init__()
        folder = Path(folder)
        self.path = str(folder)
        if hf is None:
            with (folder / "config.json").open() as f:
                hf = json.load(f)
        try:
            dims = [int(hf[k]) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")]
            dims += [int(hf["intermediate_size"]), int(hf["vocab_size"])]
        except KeyError as e:
            raise ValueError(f"{folder}/config.json: no {e.args[0]}") from None
        self.config = dnabert_config_for_architecture(*dims, float(hf.get("layer_norm_eps", 1e-12)))
        self._tokenizer = folder / "tokenizer.json"
        if not self._tokenizer.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (DNABERT-S needs its BPE tokenizer)")
        raw, self._files = read_hf_weights(folder)
        for key, value in raw.items():
            name = key[len("bert.") :] if key.startswith("bert.") else key
            self._lookup[name] = value
        type_rows = int(hf.get("type_vocab_size", DNABERT_TYPE_VOCAB))
        if type_rows < 1:
            raise ValueError(f"{folder}/config.json: type_vocab_size {type_rows} < 1")
        self._shapes["embeddings.token_type_embeddings.weight"] = (type_rows, self.config["hidden_size"])

    def tokenizer_file(self) -> Path | None:
        return self._tokenizer


def open_hf(folder: str | Path) -> WeightSource:
    """An HF folder of either family, told apart by its config.json."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    with config_path.open() as f:
        hf = json.load(f)
    if hf_family(folder, hf) == "dnabert_s":
        return DnabertHfWeights(folder, hf)
    return HfWeights(folder)


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def safetensors_index(path: Path) -> dict[str, Any]:
    """name → loader of one tensor of a .safetensors file, read with plain file reads (no memory map), so
    that memory holds one tensor at a time whatever the checkpoint size."""
    with path.open("rb") as f:
        (header_len,) = np.frombuffer(f.read(8), dtype="<u8")
        header = json.loads(f.read(int(header_len)))
    base = 8 + int(header_len)

    def loader(info: dict[str, Any]) -> np.ndarray:
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: unsupported tensor dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out = np.empty(tuple(info["shape"]), dtype=np.dtype(dtype).newbyteorder("<"))
        with path.open("rb") as f:
            f.seek(base + start)
            if f.readinto(memoryview(out).cast("B")) != end - start:
                raise ValueError(f"{path}: truncated tensor data")
        if info["dtype"] == "BF16":  # bfloat16 = the high half of a float32
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out

    return {name: (lambda info=info: loader(info)) for name, info in header.items() if name != "__metadata__"}


_FAIR_LAYER_MAP = {
    "self_attn_layer_norm": "attention.LayerNorm",
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "final_layer_norm": "LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}
_FAIR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def fair_esm_to_canonical(key: str) -> str | None:
    """fair-esm ESM2 state-dict key (prefixes stripped) → canonical HF name; None for unused tensors."""
    if key == "embed_tokens.weight":
        return "embeddings.word_embeddings.weight"
    if key.startswith("emb_layer_norm_after."):
        return "encoder." + key
    m = _FAIR_LAYER_RE.match(key)
    if m and m.group(2) in _FAIR_LAYER_MAP:
        return f"encoder.layer.{m.group(1)}.{_FAIR_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


class _Stub:
    """Stands in for classes of a checkpoint's config whose module is not installed (e.g. omegaconf)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            self.__dict__.update(state[1])


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Stub


_tolerant_pickle = types.ModuleType("virnuc_tolerant_pickle")
_tolerant_pickle.Unpickler = _TolerantUnpickler  # type: ignore[attr-defined]
_tolerant_pickle.load = lambda f, **kw: _TolerantUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_tolerant_pickle.__dict__["loads"] = pickle.loads


def _load_torch_checkpoint(path: Path) -> Any:
    """torch.load of a full fair-esm checkpoint: memory-mapped when the file allows it (zip format), and
    tolerant of config classes from packages that are not installed (their fields are kept as attributes)."""
    import torch

    for mmap in (True, False):  # legacy (non-zip) checkpoints cannot be memory-mapped
        try:
            return torch.load(
                path, map_location="cpu", mmap=mmap, weights_only=False, pickle_module=_tolerant_pickle
            )
        except RuntimeError:
            if not mmap:
                raise
    raise AssertionError("unreachable")


def _known_heads(num_layers: int, hidden: int) -> int | None:
    """Heads of the models/*.yaml entry with this depth and width (ESM-2 sizes are unambiguous)."""
    for c in family_configs("esm2"):
        if (c["num_layers"], c["hidden_size"]) == (num_layers, hidden):
            return int(c["num_heads"])
    return None


def _cfg_get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


class FairEsmWeights(_TensorMapSource):
    """A fair-esm ESM-2 checkpoint: {"model": state dict, "cfg": {"model": ...}} (or "args")."""

    kind = "fair-esm"

    def __init__(self, path: str | Path) -> None:
        super().__init__()

        path = Path(path)
        self.path = str(path)
        self._files = [path]
        data = _load_torch_checkpoint(path)
        state = data["model"] if "model" in data else data
        prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
        stripped = {prefix.sub("", k): v for k, v in state.items()}
        for key, value in stripped.items():
            name = fair_esm_to_canonical(key)
            if name is not None:
                self._lookup[name] = value
        cfg = _cfg_get(data.get("cfg"), "model") if "cfg" in data else data.get("args")
        layers = {int(m.group(1)) for k in stripped if (m := _FAIR_LAYER_RE.match(k))}
        hidden = int(stripped["embed_tokens.weight"].shape[1])
        heads = _cfg_get(cfg, "encoder_attention_heads") or _cfg_get(cfg, "attention_heads")
        if heads is None:
            heads = _known_heads(len(layers), hidden)
        if heads is None:
            raise ValueError(f"{path}: checkpoint cfg/args do not give the number of attention heads")
        token_dropout = _cfg_get(cfg, "token_dropout")
        self.config = config_for_architecture(
            len(layers),
            hidden,
            int(heads),
            int(stripped["layers.0.fc1.weight"].shape[0]),
            1e-5,
            True if token_dropout is None else bool(token_dropout),
        )


def open_source(
    hf: str | None = None,
    fair_esm: str | None = None,
    random: str | None = None,
    seed: int | None = None,
    layers: int | None = None,
    tokenizer: str | None = None,
) -> WeightSource:
    given = [x is not None for x in (hf, fair_esm, random)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --hf, --fair-esm, --random")
    if random is None and (layers is not None or tokenizer is not None):
        raise ValueError("--layers and --tokenizer go with --random (a checkpoint has its own)")
    if hf is not None:
        return open_hf(hf)
    if fair_esm is not None:
        return FairEsmWeights(fair_esm)
    if seed is None:
        raise ValueError("--random needs --seed")
    assert random is not None
    return RandomWeights(random, seed, layers=layers, tokenizer=tokenizer)
