"""`virnuc-trt merge` end to end on the CPU: the parts of an `--input-shard` split, joined, are the
whole run's file (same rows in the same order); wrong sets of parts are refused with exit 1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
from e2e_helpers import FIXTURES, Exported, run

SYNTHETIC = FIXTURES / "virnucpro_synthetic.fa"


def embed(
    binary: Path, inputs: list[Path], model: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run(
        [
            binary,
            "embed",
            *inputs,
            "--model",
            model,
            "--out",
            out,
            "--ep",
            "cpu",
            "-q",
            "--chunk",
            "300",
            *extra,
        ]
    )


def datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {name: f[name][:] for name in ("embeddings", "lengths", "input_record")}
        out["ids"] = np.array(f["sequence_ids"].asstr()[:])
        out["attrs"] = dict(f.attrs)  # type: ignore[assignment]
        return out


def test_three_shards_merge_into_the_whole_run(
    binary: Path, models: dict[str, Exported], tmp_path: Path
) -> None:
    """Two input files (17 records of 1 bp to 12 kb, then one with an empty record): records of
    many sequences, of none, and a record position counted across files."""
    model = models["virnuc"].path
    second = tmp_path / "second.fa"
    second.write_text(">empty\n\n>short\nATGGCTAAAGGTCTTTAA\n>last\n" + "ATGAAACCCGGGTTT" * 30 + "\n")
    inputs = [SYNTHETIC, second]
    whole = tmp_path / "whole.h5"
    r = embed(binary, inputs, model, whole)
    assert r.returncode == 0, r.stderr
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.h5"
        r = embed(binary, inputs, model, part, "--input-shard", f"{i}/3")
        assert r.returncode == 0, r.stderr
        parts.append(part)
    merged = tmp_path / "merged.h5"
    r = run([binary, "merge", parts[2], parts[0], parts[1], "-o", merged, "--block-rows", "7"])
    assert r.returncode == 0, r.stderr
    assert "in input order" in r.stderr
    w, m = datasets(whole), datasets(merged)
    assert list(m["ids"]) == list(w["ids"])
    np.testing.assert_array_equal(m["lengths"], w["lengths"])
    np.testing.assert_array_equal(m["input_record"], w["input_record"])
    assert m["attrs"] == w["attrs"], "merged attributes are the whole run's (input_shard = all)"
    # Record positions count both files and empty records: the second file's `empty` is record 17
    # (no rows), `short` 18, `last` 19.
    records = set(w["input_record"].tolist())
    assert 17 not in records and {18, 19} <= records and max(records) == 19
    assert all(
        i.startswith("short_") for i, rec in zip(w["ids"], w["input_record"], strict=True) if rec == 18
    )
    assert np.all(np.diff(w["input_record"].astype(np.int64)) >= 0)
    # Rows are copied, never recomputed: each merged row is its part's row exactly (independent
    # reassembly by input_record here).
    by_key = {}
    for i, part in enumerate(parts):
        p = datasets(part)
        assert np.all(p["input_record"] % 3 == i)
        for k, (rec, ident) in enumerate(zip(p["input_record"], p["ids"], strict=True)):
            by_key[(int(rec), str(ident))] = p["embeddings"][k]
    expect = np.stack(
        [by_key[(int(rec), str(i))] for rec, i in zip(m["input_record"], m["ids"], strict=True)]
    )
    np.testing.assert_array_equal(m["embeddings"], expect)
    # The whole run packs differently, so the values agree to float32 rounding only.
    np.testing.assert_allclose(m["embeddings"], w["embeddings"], rtol=1e-4, atol=1e-5)

    # Refusals: exit 1, the reason named, no output.
    bad = tmp_path / "bad.h5"
    r = run([binary, "merge", parts[0], parts[1], "-o", bad])
    assert r.returncode == 3 and "2/3" in r.stderr and "missing" in r.stderr, r.stderr
    copy = tmp_path / "copy.h5"
    shutil.copy(parts[1], copy)
    r = run([binary, "merge", *parts, copy, "-o", bad])
    assert r.returncode == 3 and "given twice" in r.stderr, r.stderr
    other = tmp_path / "other.h5"
    r = embed(binary, inputs, model, other, "--input-shard", "1/3", "--toks-per-batch", "1024")
    assert r.returncode == 0, r.stderr
    r = run([binary, "merge", parts[0], other, parts[2], "-o", bad])
    assert r.returncode == 3 and "token_budget" in r.stderr, r.stderr
    r = run([binary, "merge", whole, "-o", bad])
    assert r.returncode == 3 and "nothing to merge" in r.stderr, r.stderr
    r = run([binary, "merge", *parts, "-o", merged])
    assert r.returncode == 4 and "exists" in r.stderr, r.stderr
    r = run([binary, "merge", *parts, "-o", bad, "--block-rows", "0"])
    assert r.returncode == 2, r.stderr
    assert not bad.exists()
