#!/usr/bin/env python3
"""Writes a metagenome-like FASTA for the data-path benchmark (never committed).

Contigs and reads are cut from the real genomes in tests/fixtures (Klebsiella chromosome and plasmids,
phage lambda), on either strand, with lengths drawn log-uniformly (150 bp reads to 50 kb contigs),
about 1% substitutions and a sprinkle of N runs, so that the coding density, stop-codon statistics and
length mix resemble an assembled metagenome rather than random DNA (where almost every 500 bp frame
has a stop codon and nothing would reach the packer).
"""

from __future__ import annotations

import argparse
import gzip
import math
import random
from pathlib import Path

COMPLEMENT = bytes.maketrans(b"ACGTN", b"TGCAN")


def read_fasta(path: Path) -> list[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    seqs: list[bytes] = []
    current: list[bytes] = []
    with opener(path, "rb") as f:
        for line in f:
            if line.startswith(b">"):
                if current:
                    seqs.append(b"".join(current).upper())
                current = []
            else:
                current.append(line.strip())
    if current:
        seqs.append(b"".join(current).upper())
    return seqs


def mutate(seq: bytearray, rng: random.Random, rate: float) -> None:
    n = len(seq)
    for _ in range(int(n * rate)):
        seq[rng.randrange(n)] = b"ACGT"[rng.randrange(4)]
    if rng.random() < 0.1 and n > 40:
        start = rng.randrange(n - 20)
        run = rng.randrange(1, 20)
        seq[start : start + run] = b"N" * run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    fixtures = Path(__file__).resolve().parents[3] / "tests" / "fixtures"
    parser.add_argument("--data", type=Path, default=fixtures)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the sequence written, in GB")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    genomes = read_fasta(args.data / "klebsiella_HS11286.fna.gz") + read_fasta(args.data / "lambda_virus.fa")
    genomes += [g.translate(COMPLEMENT)[::-1] for g in genomes]
    weights = [len(g) for g in genomes]
    target = int(args.gb * 1e9)
    written = 0
    k = 0
    with open(args.out, "wb", buffering=1 << 20) as out:
        while written < target:
            g = rng.choices(genomes, weights)[0]
            length = min(len(g), int(math.exp(rng.uniform(math.log(150), math.log(50_000)))))
            start = rng.randrange(len(g) - length + 1)
            seq = bytearray(g[start : start + length])
            mutate(seq, rng, 0.01)
            out.write(b">contig_%d len=%d\n" % (k, len(seq)))
            for i in range(0, len(seq), 80):
                out.write(seq[i : i + 80])
                out.write(b"\n")
            written += len(seq)
            k += 1
    print(f"{args.out}: {k} records, {written / 1e9:.2f} Gbp")


if __name__ == "__main__":
    main()
