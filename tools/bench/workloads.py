"""The two benchmark workloads, as protein FASTA files every tool reads:

- `chunk500`: what VirNucPro embeds — the real genomes (tests/fixtures: Klebsiella HS11286, phage lambda)
  cut into 500 bp chunks, translated in six frames,
  stop-free frames kept — made by `virnuc-trt translate` (the product's own translator; there is
  deliberately no second one in Python). A seeded sample of the translated pool reaches the token target.
- `broad`: synthetic proteins, log-normal lengths clipped to 50-1024 tokens (48-1022 residues, fair-esm's
  truncation, so no tool truncates), residues drawn with UniProt background frequencies; seeded.

Tokens are counted as the model sees them: residues + `<cls>` + `<eos>`.
"""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from peers import read_fasta

GENOMES = ("klebsiella_HS11286.fna.gz", "lambda_virus.fa")
POOL_NAME = "chunk500-pool.fa"
WORKLOADS = ("chunk500", "broad")

# UniProtKB/Swiss-Prot amino-acid composition (%), release 2024_01 statistics.
_AA_FREQ = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.46, "C": 1.38, "Q": 3.93, "E": 6.72, "G": 7.07, "H": 2.27,
    "I": 5.91, "L": 9.65, "K": 5.80, "M": 2.41, "F": 3.86, "P": 4.74, "S": 6.65, "T": 5.36, "W": 1.10,
    "Y": 2.92, "V": 6.86,
}  # fmt: skip


@dataclass
class Workload:
    name: str
    path: Path
    sequences: int
    tokens: int
    note: str


class WorkloadError(RuntimeError):
    pass


def write_fasta(path: Path, records: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for name, seq in records:
            f.write(f">{name}\n")
            for i in range(0, len(seq), 60):
                f.write(seq[i : i + 60] + "\n")
    tmp.replace(path)


def broad(out: Path, target_tokens: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    letters = np.array(list(_AA_FREQ))
    p = np.array(list(_AA_FREQ.values()))
    p = p / p.sum()
    records: list[tuple[str, str]] = []
    tokens = 0
    while tokens < target_tokens:
        residues = int(np.clip(round(rng.lognormal(mean=np.log(300.0), sigma=0.6)), 48, 1022))
        seq = "".join(rng.choice(letters, size=residues, p=p))
        records.append((f"broad_{len(records):06d}", seq))
        tokens += residues + 2
    write_fasta(out, records)
    return Workload(
        "broad", out, len(records), tokens, f"synthetic, log-normal lengths 50-1024 tokens, seed {seed}"
    )


def translate_pool(binary: Path, genomes: list[Path], out: Path) -> float:
    """`virnuc-trt translate` of the genomes (500 bp chunks, six frames, stop-free) → protein FASTA."""
    if not binary.exists():
        raise WorkloadError(
            f"chunk500 needs `virnuc-trt translate` and {binary} does not exist: build it with "
            "`cargo build --release -p virnuc-trt` (or pass --virnuc-trt PATH), or stage a translated pool "
            f"({POOL_NAME}) with `tools/bench/run.py prepare`, or leave chunk500 out (--workloads broad)."
        )
    missing = [str(g) for g in genomes if not g.exists()]
    if missing:
        raise WorkloadError(f"chunk500: genome files missing: {', '.join(missing)} (see --data)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(binary),
        "translate",
        *map(str, genomes),
        "--mode",
        "nucleotide",
        "--chunk",
        "500",
        "-o",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise WorkloadError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def sample_tokens(records: list[tuple[str, str]], target_tokens: int, seed: int) -> list[tuple[str, str]]:
    """A seeded random subset reaching `target_tokens`, in the pool's order (all if the pool is smaller)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    tokens = 0
    for i in order:
        if tokens >= target_tokens:
            break
        chosen.append(i)
        tokens += min(len(records[i][1]), 1022) + 2
    return [records[i] for i in sorted(chosen)]


def chunk500(pool: Path, out: Path, target_tokens: int, seed: int) -> Workload:
    records = read_fasta(pool)
    if not records:
        raise WorkloadError(f"{pool}: no sequences (did `virnuc-trt translate` write anything?)")
    chosen = sample_tokens(records, target_tokens, seed)
    write_fasta(out, chosen)
    tokens = sum(min(len(s), 1022) + 2 for _, s in chosen)
    pool_tokens = sum(min(len(s), 1022) + 2 for _, s in records)
    return Workload(
        "chunk500",
        out,
        len(chosen),
        tokens,
        f"{' + '.join(GENOMES)}: 500 bp chunks, six frames, stop-free (virnuc-trt translate), "
        f"{len(chosen)} of {len(records)} proteins ({pool_tokens} tokens) sampled with seed {seed}",
    )
