"""Writes the golden VirNucPro fixtures: what VirNucPro's own code keeps of a FASTA file.

For each chunk length, VirNucPro's `units.py` (Li-Jing-1997/VirNucPro) is run as `prediction.py`
runs it: `split_fasta_chunk`, then `identify_seq` on each upper-cased chunk, frames with an empty
protein dropped. Two files per chunk length, same names and order:

* `<stem>.c<N>.faa`: the protein of each kept frame (what ESM-2 gets);
* `<stem>.c<N>.fna`: its `nucleotide` field, the DNA span (what DNABERT-S gets).

VirNucPro's heavy imports (torch, transformers, esm, tqdm) are stubbed out; Biopython is needed:

    python tools/virnucpro_golden.py --virnucpro /path/to/VirNucPro \\
        tests/fixtures/virnucpro_synthetic.fa --chunk 300 500 --out tests/fixtures
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import types
from pathlib import Path
from typing import Any


def load_units(virnucpro: Path) -> Any:
    """VirNucPro's `units` module, its model-loading imports replaced by empty modules."""
    for name in ("torch", "transformers", "esm", "tqdm"):
        stub = types.ModuleType(name)
        stub.AutoTokenizer = stub.AutoModel = None  # type: ignore[attr-defined]
        stub.FastaBatchedDataset = stub.pretrained = None  # type: ignore[attr-defined]
        stub.tqdm = lambda x, **_: x  # type: ignore[attr-defined]
        sys.modules.setdefault(name, stub)
    spec = importlib.util.spec_from_file_location("units", virnucpro / "units.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no units.py in {virnucpro}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kept_frames(units: Any, fasta: Path, chunk: int) -> list[tuple[str, str, str]]:
    """(frame id, protein, DNA span) for every kept frame, in VirNucPro's order."""
    from Bio import SeqIO

    out: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        chunked = Path(tmp) / "chunked.fa"
        units.split_fasta_chunk(str(fasta), str(chunked), chunk)
        for record in SeqIO.parse(str(chunked), "fasta"):
            # prediction.py's process_record: upper-case, then identify_seq.
            result = units.identify_seq(record.id, str(record.seq).upper())
            for item in result or []:
                if item.get("protein", "") != "":
                    out.append((item["seqid"], item["protein"], item["nucleotide"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fasta", type=Path)
    parser.add_argument("--virnucpro", type=Path, required=True, help="a VirNucPro checkout")
    parser.add_argument("--chunk", type=int, nargs="+", default=[300, 500])
    parser.add_argument("--out", type=Path, required=True, help="folder of the fixtures")
    args = parser.parse_args()
    units = load_units(args.virnucpro)
    stem = args.fasta.name.removesuffix(".fa")
    for chunk in args.chunk:
        frames = kept_frames(units, args.fasta, chunk)
        for suffix, column in (("faa", 1), ("fna", 2)):
            path = args.out / f"{stem}.c{chunk}.{suffix}"
            path.write_text("".join(f">{f[0]}\n{f[column]}\n" for f in frames))
            print(f"{path}: {len(frames)} frames")


if __name__ == "__main__":
    main()
