"""Independent reference embeddings from HF transformers `EsmModel`, one sequence at a time (no padding).

`python -m virnuc_export.reference (--random NAME --seed N | --hf DIR | --fair-esm FILE) --fasta P.fa
--out REF.npz [--per-token] [--repr-layer N] [--float64] [--max-residues N]`

`--hf DIR` loads the folder with `EsmModel.from_pretrained` (HF's own loader, not ours); `--random` and
`--fair-esm` go through the exporter's canonical weights into an `EsmModel` built from the same config.

REF.npz arrays: `ids` (unicode, FASTA order), `lengths` int64 [N] (residues, after truncation),
`input_ids` int64 [T] (all sequences' tokens concatenated, `<cls>` … `<eos>`), `cu_seqlens` int32 [N+1],
`mean` float32|float64 [N, H] (mean over residues of the repr layer), and with `--per-token`
`hidden` [T, H] (every token of the repr layer, `<cls>`/`<eos>` included), plus `repr_layer` int64 [].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .config import read_fasta, tokenize
from .weights import WeightSource, open_source


def hf_config(config: dict[str, Any]) -> Any:
    from transformers import EsmConfig

    return EsmConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_heads"],
        intermediate_size=config["ffn_size"],
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=config["max_positions"],
        position_embedding_type="rotary",
        layer_norm_eps=config["layer_norm_eps"],
        emb_layer_norm_before=False,
        token_dropout=config["token_dropout_scale"] != 1.0,
        mask_token_id=32,
        pad_token_id=1,
        attn_implementation="eager",
    )


def hf_model_from_source(source: WeightSource) -> Any:
    """An eval-mode `EsmModel` holding the source's canonical weights."""
    import torch
    from transformers import EsmModel

    model = EsmModel(hf_config(source.config), add_pooling_layer=False)
    state = {k: torch.from_numpy(v) for k, v in source.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "inv_freq" not in m and not m.startswith("contact_head.")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit EsmModel: missing {missing}, unexpected {unexpected}")
    return model.eval()


def hf_model_from_folder(folder: str) -> Any:
    from transformers import EsmModel

    return EsmModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager").eval()


def embed_one(model: Any, tokens: list[int], repr_layer: int | None, dtype: Any) -> np.ndarray:
    """States [L, H] of layer `repr_layer` (fair-esm repr_layers: 0 = embeddings; last = after the final
    layer norm) for one sequence, no padding, no attention mask."""
    import torch

    num_layers = model.config.num_hidden_layers
    layer = num_layers if repr_layer is None else repr_layer
    ids = torch.tensor([tokens], dtype=torch.long)
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if layer < num_layers:
        module = model.embeddings if layer == 0 else model.encoder.layer[layer - 1]

        def hook(_m: Any, _inp: Any, out: Any) -> None:
            captured["x"] = out[0] if isinstance(out, tuple) else out

        handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(input_ids=ids.to(model.device)).last_hidden_state
    finally:
        if handle is not None:
            handle.remove()
    states = captured["x"] if layer < num_layers else out
    return states[0].to(dtype).cpu().numpy()


def mean_over_residues(states: np.ndarray) -> np.ndarray:
    residues = states[1:-1]
    if len(residues) == 0:
        return np.zeros(states.shape[1], dtype=states.dtype)
    return residues.mean(axis=0)


def run_reference(
    model: Any,
    sequences: list[tuple[str, str]],
    max_residues: int,
    repr_layer: int | None = None,
    per_token: bool = False,
    float64: bool = False,
) -> dict[str, np.ndarray]:
    import torch

    dtype = torch.float64 if float64 else torch.float32
    model = model.to(dtype)
    ids, lengths, tokens_all, cu, means, hidden = [], [], [], [0], [], []
    for name, seq in sequences:
        tokens = tokenize(seq, max_residues)
        states = embed_one(model, tokens, repr_layer, dtype)
        ids.append(name)
        lengths.append(len(tokens) - 2)
        tokens_all.extend(tokens)
        cu.append(cu[-1] + len(tokens))
        means.append(mean_over_residues(states))
        if per_token:
            hidden.append(states)
    out = {
        "ids": np.array(ids, dtype=str),
        "lengths": np.array(lengths, dtype=np.int64),
        "input_ids": np.array(tokens_all, dtype=np.int64),
        "cu_seqlens": np.array(cu, dtype=np.int32),
        "mean": np.stack(means),
        "repr_layer": np.array(
            model.config.num_hidden_layers if repr_layer is None else repr_layer, dtype=np.int64
        ),
    }
    if per_token:
        out["hidden"] = np.concatenate(hidden)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m virnuc_export.reference", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR")
    src.add_argument("--fair-esm", metavar="FILE")
    src.add_argument("--random", metavar="NAME")
    p.add_argument("--seed", type=int)
    p.add_argument("--fasta", required=True, help="protein FASTA")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--per-token", action="store_true")
    p.add_argument("--repr-layer", type=int)
    p.add_argument("--float64", action="store_true", help="run the reference in float64")
    p.add_argument("--max-residues", type=int, help="truncate longer sequences (default: the model's, 1022)")
    args = p.parse_args(argv)
    if args.random is not None and args.seed is None:
        p.error("--random needs --seed")
    if args.hf is not None:
        model = hf_model_from_folder(args.hf)
        max_residues = model.config.max_position_embeddings - 4
    else:
        source = open_source(fair_esm=args.fair_esm, random=args.random, seed=args.seed)
        model = hf_model_from_source(source)
        max_residues = source.config["max_residues"]
    if args.max_residues is not None:
        max_residues = args.max_residues
    records = read_fasta(args.fasta)
    if not records:
        p.error(f"{args.fasta}: no FASTA records")
    result = run_reference(model, records, max_residues, args.repr_layer, args.per_token, args.float64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **result)
    print(f"wrote {args.out}: {len(records)} sequences, {len(result['input_ids'])} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
