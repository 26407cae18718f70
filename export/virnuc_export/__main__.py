"""`python -m virnuc_export`: ESM-2 or DNABERT-S checkpoint → packed ONNX graph + metadata (see
export/README.md)."""

from __future__ import annotations

import argparse
import sys

from . import classifier
from .export import export
from .graph import FLAVORS, GraphOptions
from .weights import open_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m virnuc_export", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--hf",
        metavar="DIR",
        help="Hugging Face folder (config.json + weights): ESM-2, or DNABERT-S/DNABERT-2 (+ tokenizer.json)",
    )
    src.add_argument("--fair-esm", metavar="FILE", help="fair-esm ESM-2 checkpoint (.pt)")
    src.add_argument(
        "--random", metavar="NAME", help="models/NAME.yaml (or a YAML path) with seeded random weights"
    )
    src.add_argument(
        "--classifier",
        metavar="FILE",
        help="VirNucPro classifier (.pth whole-module pickle or state dict, .safetensors) for predict",
    )
    src.add_argument(
        "--random-classifier",
        action="store_true",
        help="seeded random classifier for 768 + --esm-dim features (tests, demo)",
    )
    p.add_argument("--seed", type=int, help="seed for --random / --random-classifier")
    p.add_argument(
        "--layers", type=int, help="--random: this many layers instead of the config's (tests; 1..1000)"
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="--random DNABERT-S: tokenizer.json to ship (default: the project's test tokenizer, trained "
        "on tests/fixtures/lambda_virus.fa by tools/train_test_tokenizer.py)",
    )
    p.add_argument(
        "--esm-dim", type=int, help="ESM-2 width for --random-classifier (320 for t6_8M, 2560 for 3B)"
    )
    p.add_argument("--hidden-dim", type=int, default=512, help="hidden width for --random-classifier")
    p.add_argument(
        "--attention", choices=FLAVORS, default="virnuc", help="attention flavor (default: virnuc)"
    )
    p.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ORT fused ops SkipLayerNormalization/BiasGelu (default: on for virnuc/ort, off for masked)",
    )
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--per-token", action="store_true", help="also output per-token states `hidden` [T, H]")
    p.add_argument("--repr-layer", type=int, help="layer to pool, as fair-esm repr_layers (default: last)")
    p.add_argument(
        "--external-data",
        choices=("auto", "always", "never"),
        default="auto",
        help="weights in model.onnx.data (auto: when over 1 GiB)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (model.onnx, model.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.random is not None or args.random_classifier) and args.seed is None:
        print("error: --random and --random-classifier need --seed", file=sys.stderr)
        return 2
    if args.classifier is not None or args.random_classifier:
        return export_classifier(args)
    fused = args.fused if args.fused is not None else args.attention != "masked"
    try:
        source = open_source(
            hf=args.hf,
            fair_esm=args.fair_esm,
            random=args.random,
            seed=args.seed,
            layers=args.layers,
            tokenizer=args.tokenizer,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = GraphOptions(
        attention=args.attention,
        fused=fused,
        precision=args.precision,
        per_token=args.per_token,
        repr_layer=args.repr_layer,
    )
    result = export(source, options, args.out, external_data=args.external_data)
    print(
        f"wrote {result.onnx_path} ({options.attention}, {options.precision}, fused={fused}) "
        f"and {result.metadata_path} in {result.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def export_classifier(args: argparse.Namespace) -> int:
    """`--classifier FILE` / `--random-classifier`: DIR/classifier.safetensors + DIR/classifier.json."""
    try:
        if args.random_classifier:
            if args.esm_dim is None:
                print("error: --random-classifier needs --esm-dim", file=sys.stderr)
                return 2
            model = classifier.random_classifier(args.esm_dim, args.seed, args.hidden_dim)
        else:
            model = classifier.load(args.classifier)
        st, js = classifier.write(model, args.out)
    except classifier.ClassifierError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {st} and {js} ({model.input_dim} = 768 + {model.esm_dim} features, hidden "
        f"{model.hidden_dim}, {model.source['kind']})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
