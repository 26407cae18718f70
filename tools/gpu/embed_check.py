"""Compare a sample of `virnuc-trt embed` mean embeddings with a PyTorch fp32 reference (GPU machine).

    python tools/gpu/embed_check.py --h5 OUT.h5 --fasta WORKLOAD.fa --random esm2_t33_650M --seed 0 \
        [--sample 64] [--min-cosine 0.999] [--json RESULT.json]

The reference is HF transformers `EsmModel` in fp32 (TF32 off) with the exporter's seeded random
weights — the same weights the exported graph holds — each sequence alone, no padding. The sample is
spread evenly over the output rows. Exit 1 when any cosine is below the threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "export"))

from virnuc_export.config import read_fasta  # noqa: E402
from virnuc_export.reference import hf_model_from_source, run_reference  # noqa: E402
from virnuc_export.weights import open_source  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5", required=True, type=Path)
    p.add_argument("--fasta", required=True, type=Path, help="the protein FASTA that was embedded")
    p.add_argument("--random", required=True, help="model name of the random export")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=64)
    p.add_argument("--min-cosine", type=float, default=0.999)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with h5py.File(args.h5, "r") as f:
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in f["sequence_ids"][:]]
        rows = np.unique(np.linspace(0, len(ids) - 1, num=min(args.sample, len(ids))).astype(int))
        got = f["embeddings"][rows].astype(np.float64)
    by_id = dict(read_fasta(args.fasta))
    missing = [ids[r] for r in rows if ids[r] not in by_id]
    if missing:
        print(f"ids not in {args.fasta}: {missing[:5]}", file=sys.stderr)
        return 1
    source = open_source(hf=None, fair_esm=None, random=args.random, seed=args.seed)
    model = hf_model_from_source(source)
    if torch.cuda.is_available():
        model = model.cuda()
    ref = run_reference(model, [(ids[r], by_id[ids[r]]) for r in rows], max_residues=1022)
    want = ref["mean"].astype(np.float64)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    result = {
        "h5": str(args.h5),
        "model": args.random,
        "sample": len(rows),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "worst_id": ids[int(rows[int(cos.argmin())])],
        "threshold": args.min_cosine,
        "pass": bool(cos.min() >= args.min_cosine),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
