"""Independent reader check: open a virnuc-output file with h5py and recompute every value.

Usage: check_h5.py FILE N HIDDEN f32|f16 per-token|mean-only

The expected values are recomputed here from the synthetic generator's definition
(`runtime/output/src/synthetic.rs`: SplitMix64, values m / 2**23 - 1), not read from Rust, so a
wrong row order, a dropped or duplicated sequence, a kept <cls>/<eos> row or a wrong dtype fails.
"""

import sys

import h5py
import numpy as np

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & MASK
        return z ^ (z >> np.uint64(31))


def values(index: np.ndarray, stream: np.ndarray, hidden: int) -> np.ndarray:
    """[len(index), hidden] float64 values of synthetic::value(index, stream, k)."""
    k = np.arange(hidden, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        mixed = (
            splitmix64(index.astype(np.uint64))[:, None]
            ^ (stream.astype(np.uint64) * np.uint64(0x100000001))[:, None]
            ^ (k << np.uint64(40))
        )
    m = splitmix64(mixed) >> np.uint64(40)
    return m.astype(np.float64) / float(1 << 23) - 1.0


def residues(index: np.ndarray) -> np.ndarray:
    return (np.uint64(1) + splitmix64(index.astype(np.uint64) ^ np.uint64(0x5EED)) % np.uint64(40)).astype(
        np.uint32
    )


def ident(i: int) -> str:
    return f"contig{i}_chunk_1F2_é" if i % 7 == 3 else f"contig{i}_chunk_1F1"


def expect_equal(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {got.shape}, expected {want.shape}")
    bad = np.argwhere(got != want)
    if len(bad):
        first = tuple(int(x) for x in bad[0])
        raise AssertionError(
            f"{name}: {len(bad)} values differ, first at {first}: {got[first]} != {want[first]}"
        )


def main() -> None:
    path, n_text, hidden_text, dtype, mode = sys.argv[1:6]
    n, hidden = int(n_text), int(hidden_text)
    want_dtype = np.float32 if dtype == "f32" else np.float16
    with h5py.File(path, "r") as f:
        index = np.arange(n, dtype=np.uint64)
        ids = f["sequence_ids"].asstr()[:]
        if list(ids) != [ident(i) for i in range(n)]:
            raise AssertionError("sequence_ids differ")
        emb = f["embeddings"][:]
        if emb.dtype != want_dtype:
            raise AssertionError(f"embeddings dtype {emb.dtype}, expected {want_dtype}")
        expect_equal("embeddings", emb, values(index, np.zeros(n, np.uint64), hidden).astype(want_dtype))
        lengths = f["lengths"][:]
        if lengths.dtype != np.uint32:
            raise AssertionError(f"lengths dtype {lengths.dtype}")
        expect_equal("lengths", lengths, residues(index))
        # The synthetic packs give sequence i the input record i.
        records = f["input_record"][:]
        if records.dtype != np.uint64:
            raise AssertionError(f"input_record dtype {records.dtype}")
        expect_equal("input_record", records, index)
        if mode == "per-token":
            offsets = f["token_offsets"][:]
            expect_equal("token_offsets", offsets, np.concatenate([[0], np.cumsum(lengths, dtype=np.uint64)]))
            row_seq = np.repeat(index, lengths.astype(np.int64))
            starts = np.repeat(offsets[:-1], lengths.astype(np.int64))
            row_tok = np.arange(len(row_seq), dtype=np.uint64) - starts
            want = values(row_seq, row_tok + np.uint64(1), hidden).astype(want_dtype)
            expect_equal("token_states", f["token_states"][:], want)
        elif "token_states" in f:
            raise AssertionError("token_states present in a mean-only file")
        for key in ("model", "precision", "execution_provider", "random_weights"):
            if not isinstance(f.attrs[key], str):
                raise AssertionError(f"attribute {key} is not a string")
    print(f"ok {path}: {n} sequences")


if __name__ == "__main__":
    main()
