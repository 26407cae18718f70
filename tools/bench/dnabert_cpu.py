#!/usr/bin/env python3
"""CPU benchmark of `virnuc-trt embed` with DNABERT-S against VirNucPro's per-sequence path (issue 11).

    source tools/setup.sh && cargo build --release -p virnuc-trt
    python tools/bench/dnabert_cpu.py [--fasta F.fa ...] [--chunk 500] [--layers 12]
        [--attention virnuc] [--work out/bench-dnabert] [--passes 3] [--out result.md]

Same random weights on both sides (the exporter's seeded RandomWeights, seed 0) and the same frames
(VirNucPro's DNA spans, `--virnucpro-compat`), in the same run:

  virnuc-trt   `virnuc-trt embed --ep cpu --virnucpro-compat` on the FASTA (release binary, a fresh
               process as a user runs it: reading, chunking, translation, tokenizing, packing, HDF5
               included); its report's wall time, model load included.
  VirNucPro    `extract_DNABERT_S` as it runs: each span tokenized alone by the same tokenizer.json
               (Python `tokenizers`, truncation/padding off) and run alone through a PyTorch fp32
               MosaicBERT forward (tools/bench/predict_cpu.py's `DnabertS`, written from the original
               `bert_layers.py`), then `torch.mean` over all tokens. Frames and model construction are
               not timed; only tokenizing and the forward passes.

Prints a Markdown table (frames, seconds, frames/s, speed-up, the largest difference of the means as a
correctness check: ≤ 1e-4 expected). Run it on a quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_cpu import FIXTURES, ROOT, DnabertS, RandomWeights, export


def spans(binary: Path, fasta: list[Path], chunk: int, out: Path) -> list[tuple[str, str]]:
    cmd = [str(binary), "translate", *map(str, fasta), "--chunk", str(chunk), "--dna"]
    r = subprocess.run([*cmd, "--virnucpro-compat", "-o", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"translate failed: {r.stderr}")
    lines = out.read_text().splitlines()
    return [(lines[i][1:], lines[i + 1]) for i in range(0, len(lines), 2)]


def peer(frames: list[tuple[str, str]], layers: int, tokenizer: Path) -> tuple[float, np.ndarray]:
    from tokenizers import Tokenizer

    torch.set_grad_enabled(False)
    src = RandomWeights("dnabert_s", 0, layers=layers)
    model = DnabertS(src.state_dict(), src.config)
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_truncation()
    tok.no_padding()
    t0 = time.monotonic()
    means = [model(torch.tensor(tok.encode(dna).ids)).mean(0) for _, dna in frames]
    return time.monotonic() - t0, torch.stack(means).numpy()


def ours(binary: Path, model: Path, fasta: list[Path], chunk: int, work: Path) -> tuple[float, np.ndarray]:
    out, report = work / "embed.h5", work / "embed.json"
    out.unlink(missing_ok=True)
    cmd = [
        str(binary),
        "embed",
        *map(str, fasta),
        "--model",
        str(model),
        "--ep",
        "cpu",
        "--chunk",
        str(chunk),
    ]
    r = subprocess.run(
        [*cmd, "--virnucpro-compat", "-o", str(out), "--report", str(report), "-q"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.exit(f"embed failed: {r.stderr}")
    with h5py.File(out) as f:
        emb = f["embeddings"][:]
    return float(json.loads(report.read_text())["wall_s"]), emb


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fasta", type=Path, nargs="+", default=[FIXTURES / "lambda_virus.fa"])
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--attention", default="virnuc", choices=["virnuc", "masked"])
    p.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "virnuc-trt")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-dnabert")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = export(
        ["--random", "dnabert_s", "--layers", str(a.layers), "--seed", "0", "--attention", a.attention],
        a.work / f"dnabert_s_{a.layers}l_{a.attention}",
    )
    frames = spans(a.bin, a.fasta, a.chunk, a.work / "spans.fna")
    rows = [
        "| pass | frames | VirNucPro per-sequence (s) | virnuc-trt embed (s) | speed-up | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for n in range(1, a.passes + 1):
        # Alternate the order pass by pass so that neither side always runs on a warmer machine.
        if n % 2:
            t_peer, m_peer = peer(frames, a.layers, model / "tokenizer.json")
            t_ours, m_ours = ours(a.bin, model, a.fasta, a.chunk, a.work)
        else:
            t_ours, m_ours = ours(a.bin, model, a.fasta, a.chunk, a.work)
            t_peer, m_peer = peer(frames, a.layers, model / "tokenizer.json")
        diff = float(np.abs(m_ours - m_peer).max())
        rows.append(
            f"| {n} | {len(frames)} | {t_peer:.2f} | {t_ours:.2f} | {t_peer / t_ours:.2f}x | {diff:.1e} |"
        )
    table = "\n".join(rows)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
