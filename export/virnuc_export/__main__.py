"""`python -m virnuc_export`: ESM-2 checkpoint → packed ONNX graph + metadata (see export/README.md)."""

from __future__ import annotations

import argparse
import sys

from .export import export
from .graph import FLAVORS, GraphOptions
from .weights import open_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m virnuc_export", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face ESM-2 folder (config.json + weights)")
    src.add_argument("--fair-esm", metavar="FILE", help="fair-esm ESM-2 checkpoint (.pt)")
    src.add_argument(
        "--random", metavar="NAME", help="models/NAME.yaml (or a YAML path) with seeded random weights"
    )
    p.add_argument("--seed", type=int, help="seed for --random")
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
    if args.random is not None and args.seed is None:
        print("error: --random needs --seed", file=sys.stderr)
        return 2
    fused = args.fused if args.fused is not None else args.attention != "masked"
    source = open_source(hf=args.hf, fair_esm=args.fair_esm, random=args.random, seed=args.seed)
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


if __name__ == "__main__":
    sys.exit(main())
