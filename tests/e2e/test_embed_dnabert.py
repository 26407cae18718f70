"""`virnuc-trt embed --model <DNABERT-S export>` end to end on lambda (CPU, random 2-layer weights).

Each kept frame's DNA span is embedded; the embeddings equal the exporter's float64 numpy reference
of DNABERT-S run on each span alone (tokenized by Python `tokenizers` from the export's own
`tokenizer.json`), and the ids and order equal those of an ESM-2 run on the same input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
from e2e_helpers import FIXTURES, ROOT, Exported, run

SEED = 0


def read_h5(path: Path) -> tuple[list[str], np.ndarray]:
    with h5py.File(path, "r") as f:
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in f["sequence_ids"][:]]
        return ids, f["embeddings"][:]


def read_fasta(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    return [(lines[i][1:], lines[i + 1]) for i in range(0, len(lines), 2)]


def export_dnabert(out: Path, *extra: str) -> None:
    """A random 2-layer masked DNABERT-S export (seed SEED) into `out`."""
    r = run(
        [
            *(sys.executable, "-m", "virnuc_export", "--random", "dnabert_s", "--seed", SEED),
            *("--layers", "2", "--attention", "masked", *extra, "--out", out),
        ],
        cwd=ROOT / "export",
    )
    assert r.returncode == 0, r.stderr


def test_dnabert_embed_equals_float64_reference_with_the_esm_ids(
    binary: Path, models: dict[str, Exported], tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    from virnuc_export import dnabert_reference
    from virnuc_export.weights import RandomWeights

    model = tmp_path / "dnabert"
    export_dnabert(model)
    lam = FIXTURES / "lambda_virus.fa"
    out = tmp_path / "dna.h5"
    common = ["--ep", "cpu", "--virnucpro-compat", "-q"]
    r = run([binary, "embed", lam, "--model", model, "-o", out, *common])
    assert r.returncode == 0, r.stderr
    ids, emb = read_h5(out)
    assert emb.shape == (len(ids), 768) and len(ids) > 20

    # Same frames, names and order as the ESM-2 run.
    esm_out = tmp_path / "esm.h5"
    r = run([binary, "embed", lam, "--model", models["masked"].path, "-o", esm_out, *common])
    assert r.returncode == 0, r.stderr
    assert read_h5(esm_out)[0] == ids

    # The spans embed fed the model (translate --dna: same pipeline), each alone through float64.
    spans_file = tmp_path / "spans.fna"
    r = run([binary, "translate", lam, "--dna", "--virnucpro-compat", "-o", spans_file])
    assert r.returncode == 0, r.stderr
    spans = read_fasta(spans_file)
    assert [s[0] for s in spans] == ids
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    source = RandomWeights("dnabert_s", SEED, layers=2)
    w64 = {k: v.astype(np.float64) for k, v in source.items()}
    worst = 0.0
    for (_, dna), got in zip(spans, emb, strict=True):
        states = dnabert_reference.forward(w64, source.config, tok.encode(dna).ids)
        want = dnabert_reference.mean_all_tokens(states)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst <= 1e-5, worst

    # Protein inputs to a DNA model: a usage error, nothing written.
    bad = tmp_path / "bad.h5"
    globins = FIXTURES / "globins45.fa"
    r = run([binary, "embed", globins, "--mode", "protein", "--model", model, "-o", bad, "--ep", "cpu"])
    assert r.returncode == 2 and "DNABERT-S" in r.stderr and not bad.exists(), r.stderr


def test_gate_compares_dnabert_on_its_own_tokens(binary: Path, tmp_path: Path) -> None:
    """`gate` on two DNABERT-S exports (fp16 against fp32) tokenizes the frames' DNA spans with the
    export's tokenizer: the tokens it compares are exactly those of the spans (the ESM-2 alphabet on
    the proteins, which the gate once fed every model, gives another count and still passed)."""
    import json

    from tokenizers import Tokenizer

    exports = {}
    for precision in ("fp32", "fp16"):
        exports[precision] = tmp_path / precision
        export_dnabert(exports[precision], "--precision", precision)
    lam = FIXTURES / "lambda_virus.fa"
    report = tmp_path / "gate.json"
    r = run(
        [
            binary,
            "gate",
            *("--candidate", exports["fp16"], "--reference", exports["fp32"], "--input", lam),
            *("--ep", "cpu", "--json", report),
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    gate = json.loads(report.read_text())
    assert gate["pass"] and gate["mean_cosine"] >= 0.999

    spans_file = tmp_path / "spans.fna"
    r = run([binary, "translate", lam, "--dna", "-o", spans_file])
    assert r.returncode == 0, r.stderr
    spans = read_fasta(spans_file)
    tok = Tokenizer.from_file(str(exports["fp32"] / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    assert gate["sequences"] == len(spans)
    assert gate["tokens"] == sum(len(tok.encode(dna).ids) for _, dna in spans)


def test_build_makes_a_dnabert_engine_that_embeds_as_its_export(binary: Path, tmp_path: Path) -> None:
    """`build` on a DNABERT-S export: the engine folder carries the tokenizer its model.json names
    (it once did not, and the build failed on opening its own engine), and embeds as the export."""
    model = tmp_path / "dnabert"
    export_dnabert(model)
    engine = tmp_path / "engine"
    r = run([binary, "build", "--model", model, "--ep", "cpu", "--out", engine, "--budget", "1024"])
    assert r.returncode == 0, r.stderr
    assert (engine / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    lam = FIXTURES / "lambda_virus.fa"
    got = {}
    for name, path in (("export", model), ("engine", engine)):
        out = tmp_path / f"{name}.h5"
        r = run([binary, "embed", lam, "--model", path, "-o", out, "--ep", "cpu", "-q"])
        assert r.returncode == 0, r.stderr
        got[name] = read_h5(out)
    assert got["engine"][0] == got["export"][0]
    a, b = got["engine"][1].astype(np.float64), got["export"][1].astype(np.float64)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
