"""Model configurations (`models/*.yaml`, shared with the Rust runtime) and the ESM-2 alphabet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

# fair-esm `Alphabet.from_architecture("ESM-1b")` order; id = index. Matches runtime/core/src/alphabet.rs.
ALPHABET: list[str] = [
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
]  # fmt: skip
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32

# Model families. The family decides the graph, the tokenizer and the pooling rule.
FAMILIES: tuple[str, ...] = ("esm2", "dnabert_s")

# The fields of the Rust `ModelConfig` (deny_unknown_fields): the common ones, then the ESM-2-only ones
# (optional in Rust, present exactly for ESM-2). JSON/YAML key order carries no meaning.
_COMMON_FIELDS: tuple[str, ...] = (
    "name",
    "family",
    "checkpoint",
    "hf_repo",
    "num_layers",
    "hidden_size",
    "num_heads",
    "ffn_size",
    "vocab_size",
    "layer_norm_eps",
)
ESM2_ONLY_FIELDS: tuple[str, ...] = ("max_positions", "max_residues", "rotary_base", "token_dropout_scale")
CONFIG_FIELDS: tuple[str, ...] = (*_COMMON_FIELDS, *ESM2_ONLY_FIELDS)
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {"esm2": CONFIG_FIELDS, "dnabert_s": _COMMON_FIELDS}
_INT_FIELDS = {
    "num_layers",
    "hidden_size",
    "num_heads",
    "ffn_size",
    "vocab_size",
    "max_positions",
    "max_residues",
}
_FLOAT_FIELDS = {"layer_norm_eps", "rotary_base", "token_dropout_scale"}

_TOKEN_IDS = {tok: i for i, tok in enumerate(ALPHABET) if len(tok) == 1}


def repo_root() -> Path:
    env = os.environ.get("VIRNUC_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2]


def models_dir() -> Path:
    return repo_root() / "models"


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Checks the fields and types of a model config; returns it normalised (field order, int/float).

    `family` may be left out (older configs): it is then `esm2`."""
    config = {"family": "esm2", **config}
    family = config["family"]
    if family not in FAMILIES:
        raise ValueError(f"model config: family {family!r} is not one of {', '.join(FAMILIES)}")
    fields = FAMILY_FIELDS[family]
    missing = [f for f in fields if f not in config]
    extra = [k for k in config if k not in fields]
    if missing or extra:
        raise ValueError(f"model config ({family}): missing fields {missing}, unknown fields {extra}")
    out: dict[str, Any] = {}
    for f in fields:
        v = config[f]
        out[f] = int(v) if f in _INT_FIELDS else float(v) if f in _FLOAT_FIELDS else str(v)
    for f in ("num_layers", "hidden_size", "num_heads", "ffn_size", "vocab_size"):
        if out[f] <= 0:
            raise ValueError(f"model config: {f} must be positive, not {out[f]}")
    if out["hidden_size"] % out["num_heads"] != 0:
        raise ValueError(
            f"hidden_size {out['hidden_size']} is not a multiple of num_heads {out['num_heads']}"
        )
    if not 0.0 < out["layer_norm_eps"] < 1.0:
        raise ValueError(f"layer_norm_eps {out['layer_norm_eps']} outside (0, 1)")
    if family == "esm2":
        if (out["hidden_size"] // out["num_heads"]) % 2 != 0:
            raise ValueError("head_dim must be even for rotary embeddings")
        if out["vocab_size"] != len(ALPHABET):
            raise ValueError(f"vocab_size {out['vocab_size']} != ESM-2 alphabet size {len(ALPHABET)}")
    elif out["vocab_size"] < 9:
        raise ValueError(f"vocab_size {out['vocab_size']}: DNABERT-S needs 5 special tokens + A C G T")
    return out


def family_configs(family: str) -> list[dict[str, Any]]:
    """The models/*.yaml entries of one family, sorted by file name."""
    out = []
    for path in sorted(models_dir().glob("*.yaml")):
        with path.open() as f:
            c = validate_config(yaml.safe_load(f))
        if c["family"] == family:
            out.append(c)
    return out


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """`esm2_t6_8M` (looked up in models/) or a path to a YAML file with the same fields."""
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) and path.exists()):
        path = models_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in models_dir().glob("*.yaml"))
        raise FileNotFoundError(f"no model config {name_or_path!r} (known: {', '.join(known)})")
    with path.open() as f:
        config = yaml.safe_load(f)
    return validate_config(config)


def config_for_architecture(
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_size: int,
    layer_norm_eps: float,
    token_dropout: bool,
) -> dict[str, Any]:
    """The models/*.yaml ESM-2 entry with this architecture, or a custom config named after it."""
    for c in family_configs("esm2"):
        if (c["num_layers"], c["hidden_size"], c["num_heads"], c["ffn_size"]) == (
            num_layers,
            hidden_size,
            num_heads,
            ffn_size,
        ):
            c["layer_norm_eps"] = float(layer_norm_eps)
            c["token_dropout_scale"] = 0.88 if token_dropout else 1.0
            return c
    return validate_config(
        {
            "name": f"esm2_custom_t{num_layers}_h{hidden_size}",
            "family": "esm2",
            "checkpoint": "",
            "hf_repo": "",
            "num_layers": num_layers,
            "hidden_size": hidden_size,
            "num_heads": num_heads,
            "ffn_size": ffn_size,
            "vocab_size": len(ALPHABET),
            "max_positions": 1026,
            "max_residues": 1022,
            "layer_norm_eps": layer_norm_eps,
            "rotary_base": 10000.0,
            "token_dropout_scale": 0.88 if token_dropout else 1.0,
        }
    )


def tokenize(sequence: str, max_residues: int | None = None) -> list[int]:
    """`<cls>` + residues + `<eos>`; lowercase accepted, unknown characters become `<unk>`."""
    residues = sequence.strip().upper()
    if max_residues is not None:
        residues = residues[:max_residues]
    return [CLS, *(_TOKEN_IDS.get(c, UNK) for c in residues), EOS]


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """Minimal FASTA reader for the reference CLI and tests: [(id, sequence)]."""
    records: list[tuple[str, str]] = []
    name: str | None = None
    chunks: list[str] = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.startswith(">"):
                if name is not None:
                    records.append((name, "".join(chunks)))
                name = line[1:].split()[0] if line[1:].strip() else ""
                chunks = []
            elif line.strip():
                chunks.append(line.strip())
    if name is not None:
        records.append((name, "".join(chunks)))
    return records
