"""`virnuc-trt embed` end to end on the CPU: against HF transformers, packed vs alone, wrong inputs,
resume after `kill -9`, exit codes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from e2e_helpers import FIXTURES, Exported, hf_reference, run

LAMBDA = FIXTURES / "lambda_virus.fa"
GLOBINS = FIXTURES / "globins45.fa"


def read_h5(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in f["sequence_ids"][:]]
        return {
            "ids": np.array(ids),
            "lengths": f["lengths"][:],
            "embeddings": f["embeddings"][:],
            "attrs": dict(f.attrs),
        }


def embed(
    binary: Path, inputs: list[Path], model: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run(
        [binary, "embed", *inputs, "--model", model, "--out", out, "--ep", "cpu", "-q", *extra],
    )


def row_errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(min cosine over rows, max over rows of max|diff| / max|want row|)."""
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    cos = (g * w).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1))
    rel = np.abs(g - w).max(1) / np.abs(w).max(1)
    return float(cos.min()), float(rel.max())


CASES = {"lambda-nucleotide": ("nucleotide", LAMBDA), "globins-protein": ("protein", GLOBINS)}


@pytest.fixture(scope="module")
def references(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    """Per case: the proteins `translate` writes and HF transformers' embeddings of them."""
    refs = {}
    for case, (mode, fasta) in CASES.items():
        d = tmp_path_factory.mktemp(case)
        proteins = d / "proteins.fa"
        r = run([binary, "translate", fasta, "--mode", mode, "--chunk", "500", "-o", proteins])
        assert r.returncode == 0, r.stderr
        refs[case] = hf_reference(proteins, d / "ref.npz")
    return refs


@pytest.mark.parametrize("flavor", ["masked", "virnuc"])
@pytest.mark.parametrize("case", list(CASES))
def test_embeddings_match_hf_transformers(
    binary: Path,
    models: dict[str, Exported],
    references: dict[str, dict[str, np.ndarray]],
    tmp_path: Path,
    flavor: str,
    case: str,
) -> None:
    mode, fasta = CASES[case]
    ref = references[case]
    out = tmp_path / "out.h5"
    r = embed(binary, [fasta], models[flavor].path, out, "--mode", mode, "--chunk", "500")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    got = read_h5(out)
    n = len(ref["ids"])
    assert n >= 40, n
    assert report["sequences"] == n and report["data"]["complete"]
    assert report["packs"] > 1, "the run should pack sequences together, several packs"
    assert list(got["ids"]) == list(ref["ids"]), "ids or order differ from translate's"
    assert np.array_equal(got["lengths"], ref["lengths"])
    cos, rel = row_errors(got["embeddings"], ref["mean"])
    assert cos >= 0.99999 and rel <= 1e-4, (cos, rel)
    # The check can fail: the same embeddings one row off are far from the reference.
    cos_off, _ = row_errors(got["embeddings"][1:], ref["mean"][:-1])
    assert cos_off < 0.99, cos_off
    assert got["attrs"]["random_weights"] == "true"


@pytest.mark.parametrize("flavor", ["masked", "virnuc"])
def test_packed_equals_each_sequence_alone(
    binary: Path, models: dict[str, Exported], tmp_path: Path, flavor: str
) -> None:
    model = models[flavor].path
    packed, alone = tmp_path / "packed.h5", tmp_path / "alone.h5"
    r = embed(binary, [GLOBINS], model, packed, "--mode", "protein", "--toks-per-batch", "2048")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["packs"] < 10
    # A budget below every sequence: each pack holds one sequence.
    r = embed(binary, [GLOBINS], model, alone, "--mode", "protein", "--toks-per-batch", "3")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["packs"] == report["sequences"] == 45
    a, b = read_h5(packed), read_h5(alone)
    assert list(a["ids"]) == list(b["ids"])
    _, rel = row_errors(a["embeddings"], b["embeddings"])
    assert rel <= 1e-5, rel


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} written by a failed run"
    assert not Path(f"{out}.partial").exists(), "working files left by a run that never started"


def test_wrong_inputs_fail_clearly_and_write_nothing(
    binary: Path, models: dict[str, Exported], tmp_path: Path
) -> None:
    model = models["virnuc"].path
    out = tmp_path / "out.h5"

    r = embed(binary, [GLOBINS], tmp_path / "no-such-model", out, "--mode", "protein")
    assert r.returncode == 5 and "does not exist" in r.stderr, r.stderr
    assert_nothing_written(out)

    # Graph of one export, metadata of another.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "model.onnx").write_bytes((models["masked"].path / "model.onnx").read_bytes())
    (mixed / "model.json").write_bytes((model / "model.json").read_bytes())
    r = embed(binary, [GLOBINS], mixed, out, "--mode", "protein")
    assert r.returncode == 5 and "sha256" in r.stderr, r.stderr
    assert_nothing_written(out)

    # Metadata whose hidden size disagrees with the graph (hash check off to reach the graph check).
    meta = json.loads((model / "model.json").read_text())
    meta["outputs"][0]["shape"] = ["B", "480"]
    meta["model"]["hidden_size"] = 480
    (mixed / "model.onnx").write_bytes((model / "model.onnx").read_bytes())
    (mixed / "model.json").write_text(json.dumps(meta))
    r = embed(binary, [GLOBINS], mixed, out, "--mode", "protein", "--skip-hash")
    assert r.returncode == 5 and "mismatch" in r.stderr and "480" in r.stderr, r.stderr
    assert_nothing_written(out)

    # Unwritable output: its folder does not exist / is a file.
    bad = tmp_path / "a-file"
    bad.write_text("x")
    r = embed(binary, [GLOBINS], model, bad / "out.h5", "--mode", "protein")
    assert r.returncode == 4 and "cannot write output" in r.stderr, r.stderr
    assert_nothing_written(bad / "out.h5")

    # Output exists, no --resume: refused, file untouched.
    out.write_bytes(b"precious")
    r = embed(binary, [GLOBINS], model, out, "--mode", "protein")
    assert r.returncode == 4 and "already exists" in r.stderr, r.stderr
    assert out.read_bytes() == b"precious"
    out.unlink()

    # A GPU asked for on this machine: the reason, not a CPU run.
    r = run([binary, "embed", GLOBINS, "--mode", "protein", "--model", model, "--out", out, "--ep", "cuda"])
    assert r.returncode == 5, r.stderr
    assert "execution provider cuda" in r.stderr, r.stderr
    assert_nothing_written(out)

    # Missing input file: named in the error.
    r = embed(binary, [tmp_path / "nope.fa"], model, out, "--mode", "protein")
    assert r.returncode == 3 and "nope.fa" in r.stderr, r.stderr
    assert not out.exists()


def test_usage_errors_exit_2(binary: Path, tmp_path: Path) -> None:
    r = run([binary, "embed", GLOBINS, "--out", tmp_path / "o.h5"])
    assert r.returncode == 2 and "--model" in r.stderr, r.stderr
    r = run([binary, "embed", "--no-such-flag"])
    assert r.returncode == 2, r.stderr
    r = run([binary, "embed", "--help"])
    assert r.returncode == 0 and "--toks-per-batch" in r.stdout and "VIRNUC_EP" in r.stdout


def test_broken_pipe_exits_0(binary: Path) -> None:
    r = run(["bash", "-c", f"set -o pipefail; '{binary}' translate '{LAMBDA}' --chunk 300 | head -n 1"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(">")


def test_input_shards_together_equal_the_whole_run(
    binary: Path, models: dict[str, Exported], tmp_path: Path
) -> None:
    """`--input-shard I/N` (one process per GPU, or a job array): the N files hold every sequence of
    the unsharded run once, with its embedding; each report accounts for the other shards' records."""
    model = models["virnuc"].path
    whole = tmp_path / "whole.h5"
    r = embed(binary, [GLOBINS], model, whole, "--mode", "protein")
    assert r.returncode == 0, r.stderr
    want = read_h5(whole)
    got_ids: list[str] = []
    got_rows: list[np.ndarray] = []
    for i in range(3):
        out = tmp_path / f"part{i}.h5"
        r = embed(binary, [GLOBINS], model, out, "--mode", "protein", "--input-shard", f"{i}/3")
        assert r.returncode == 0, r.stderr
        assert f"input shard {i}/3" in r.stderr
        data = json.loads(r.stdout)["data"]
        assert data["input_shard"] == f"{i}/3" and data["records_read"] == 45
        assert data["records_other_shards"] + data["stages"]["records_processed"] == 45
        part = read_h5(out)
        assert part["attrs"]["input_shard"] == f"{i}/3"
        # Round robin by record: shard i holds records i, i + 3, ... in input order.
        assert list(part["ids"]) == list(want["ids"][i::3])
        got_ids += list(part["ids"])
        got_rows += list(part["embeddings"])
    assert sorted(got_ids) == sorted(want["ids"])
    order = {k: n for n, k in enumerate(got_ids)}
    rows = np.stack([got_rows[order[k]] for k in want["ids"]])
    _, rel = row_errors(rows, want["embeddings"])
    assert rel <= 1e-5, rel
    assert read_h5(whole)["attrs"]["input_shard"] == "all"
    # A finished file is "nothing to resume" only for the same run; another part is refused.
    again = ["--mode", "protein", "--resume"]
    r = embed(binary, [GLOBINS], model, tmp_path / "part0.h5", *again, "--input-shard", "0/3")
    assert r.returncode == 0 and "nothing to resume" in r.stderr, r.stderr
    r = embed(binary, [GLOBINS], model, tmp_path / "part0.h5", *again, "--input-shard", "1/3")
    assert r.returncode != 0 and 'input_shard = "0/3"' in r.stderr, r.stderr
    for bad in ("3/3", "1/0", "x"):
        r = embed(binary, [GLOBINS], model, tmp_path / "bad.h5", "--input-shard", bad)
        assert r.returncode == 2 and "I/N" in r.stderr, r.stderr


def test_yaml_run_config(binary: Path, models: dict[str, Exported], tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"inputs: [{GLOBINS}]\nmodel: {models['virnuc'].path}\nout: out.h5\n"
        "mode: protein\nep: cpu\ntoks_per_batch: 1024\nprecision: fp16\nreport: report.json\n"
    )
    r = run([binary, "embed", "--config", cfg, "-q"])
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["token_budget"] == 1024 and report["output_precision"] == "fp16"
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["embeddings"].dtype == np.float16 and f["embeddings"].shape == (45, 320)
    cfg.write_text(cfg.read_text() + "toks_per_btach: 5\n")
    r = run([binary, "embed", "--config", cfg])
    assert r.returncode == 2 and "toks_per_btach" in r.stderr, r.stderr


def test_resume_after_kill_gives_the_uninterrupted_file(
    binary: Path, models: dict[str, Exported], tmp_path: Path
) -> None:
    model = models["virnuc"].path
    args = ["--chunk", "300", "--toks-per-batch", "600", "--shard-sequences", "3"]
    whole = tmp_path / "whole.h5"
    started = time.monotonic()
    r = embed(binary, [LAMBDA], model, whole, *args)
    assert r.returncode == 0, r.stderr
    # Kill points are fractions of this run's own duration, so the test neither depends on the machine's
    # speed nor lets a fast machine finish before the kills land (a fixed 1-4 s sleep did).
    duration = time.monotonic() - started
    want = read_h5(whole)

    out = tmp_path / "resumed.h5"
    base = [binary, "embed", LAMBDA, "--model", model, "--out", out, "--ep", "cpu", "-q", *args]
    rng = random.Random(20261126)
    kills = 0
    for attempt in range(4):
        cmd = base + (["--resume"] if attempt > 0 else [])
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.15, 0.45) * duration)
        if p.poll() is not None:
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        assert not out.exists(), "a killed run left a final file"
    assert kills >= 2, f"only {kills} kills landed mid-run (whole run {duration:.1f} s)"
    # A resume over a changed input is refused (exit 3) and changes nothing: the genome with one
    # base changed in every chunk (whichever sequences are done, one differs), and the genome
    # behind another record.
    seq = LAMBDA.read_text().split("\n", 1)
    edited = tmp_path / "edited.fa"
    body = list(seq[1].replace("\n", ""))
    for k in range(10, len(body), 300):
        body[k] = {"A": "C", "C": "G", "G": "T", "T": "A"}.get(body[k], "A")
    edited.write_text(f"{seq[0]}\n{''.join(body)}\n")
    body = "".join(body)
    prefixed = tmp_path / "prefixed.fa"
    prefixed.write_text(">extra\n" + body[:900] + "\n" + LAMBDA.read_text())
    journal = Path(f"{out}.partial/journal").read_bytes()
    for changed in (edited, prefixed):
        r = run(
            [binary, "embed", changed, "--model", model, "--out", out, "--ep", "cpu", "-q", *args, "--resume"]
        )
        assert r.returncode == 3 and "the input is not the one" in r.stderr, r.stderr
        assert json.loads(r.stdout)["complete"] is False
        assert not out.exists() and Path(f"{out}.partial/journal").read_bytes() == journal
    r = run([*base, "--resume"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    # The last run continued earlier work rather than starting over, and its report adds up.
    assert report["resumed"] and 0 < report["sequences_this_run"] < report["sequences"], report
    again_out = tmp_path / "again.h5"
    again = run([binary, "embed", LAMBDA, "--model", model, "--out", again_out, "--ep", "cpu", "-q", *args])
    for rep in (report, json.loads(again.stdout)):
        data = rep["data"]
        assert data["complete"] and data["stages"]["sequences"] == data["packing"]["sequences"], rep
        assert rep["sequences_this_run"] + rep["sequences_skipped_resume"] == rep["sequences"], rep
        assert rep["sequences_skipped_resume"] == data["skipped_resume"], rep
        assert rep["packs"] + data["packs_skipped_resume"] == data["packing"]["packs"], rep
    got = read_h5(out)
    assert list(got["ids"]) == list(want["ids"])
    assert np.array_equal(got["lengths"], want["lengths"])
    assert np.array_equal(got["embeddings"], want["embeddings"]), "resumed embeddings differ bitwise"
    assert got["attrs"] == want["attrs"]
    assert not Path(f"{out}.partial").exists()
    assert out.read_bytes() == whole.read_bytes(), "files differ byte for byte"
