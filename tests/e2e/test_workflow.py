"""The Snakemake workflow (workflow/Snakefile) end to end with the local executor on the demo models:
3 shard jobs and the merge give the rows of one `virnuc-trt embed` over the same inputs; the predict
stage (3 shard jobs, merge, results) gives the files of one `virnuc-trt predict`.

Needs snakemake (pinned in requirements.txt). Without it the test is skipped and says so;
VIRNUC_SNAKEMAKE may name a snakemake executable of another environment."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from e2e_helpers import FIXTURES, ROOT, Exported, run


def snakemake_command() -> list[str]:
    exe = os.environ.get("VIRNUC_SNAKEMAKE")
    if exe:
        return [exe]
    if importlib.util.find_spec("snakemake") is not None:
        return [sys.executable, "-m", "snakemake"]
    pytest.skip("snakemake is not installed (pip install -r requirements.txt, or set VIRNUC_SNAKEMAKE)")


def rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            "ids": np.array(f["sequence_ids"].asstr()[:]),
            "lengths": f["lengths"][:],
            "input_record": f["input_record"][:],
            "embeddings": f["embeddings"][:],
        }


def test_workflow_shards_and_merge_equal_one_embed(
    binary: Path, models: dict[str, Exported], tmp_path: Path
) -> None:
    snakemake = snakemake_command()
    model = models["virnuc"].path
    inputs = [FIXTURES / "virnucpro_synthetic.fa"]
    flags = ["--ep", "cpu", "--mode", "nucleotide", "--chunk", "300", "--threads", "1"]
    config = tmp_path / "config.yaml"
    config.write_text(
        f"inputs: {[str(p) for p in inputs]}\nmodel: {model}\nshards: 3\nout: out/all.h5\n"
        f"parts_dir: out/parts\nbinary: {binary}\nembed_args: {flags}\nthreads: 1\ngpus: 0\n"
    )
    r = run(
        [
            *snakemake,
            "-s",
            ROOT / "workflow" / "Snakefile",
            "--configfile",
            config,
            "--cores",
            "2",
            "--directory",
            tmp_path,
            "--quiet",
            "rules",
        ]
    )
    assert r.returncode == 0, f"snakemake failed:\n{r.stdout}\n{r.stderr}"
    merged = tmp_path / "out" / "all.h5"
    assert merged.is_file()
    for i in range(3):
        assert (tmp_path / "out" / "parts" / f"part{i}.json").is_file()
    single = tmp_path / "single.h5"
    r = run([binary, "embed", *inputs, "--model", model, "--out", single, "-q", *flags])
    assert r.returncode == 0, r.stderr
    got, want = rows(merged), rows(single)
    assert list(got["ids"]) == list(want["ids"])
    np.testing.assert_array_equal(got["lengths"], want["lengths"])
    np.testing.assert_array_equal(got["input_record"], want["input_record"])
    # Shards pack differently from the single run: equal up to float32 rounding.
    np.testing.assert_allclose(got["embeddings"], want["embeddings"], rtol=1e-4, atol=1e-5)

    # A second call finds everything done; a lost part is recomputed (and resumed) alone.
    (tmp_path / "out" / "parts" / "part1.h5").unlink()
    merged.unlink()
    r = run(
        [
            *snakemake,
            "-s",
            ROOT / "workflow" / "Snakefile",
            "--configfile",
            config,
            "--cores",
            "2",
            "--directory",
            tmp_path,
            "--quiet",
            "rules",
        ]
    )
    assert r.returncode == 0, f"snakemake failed:\n{r.stdout}\n{r.stderr}"
    assert rows(merged)["ids"].tolist() == want["ids"].tolist()
    shutil.rmtree(tmp_path / "out")


def test_workflow_predict_stage_equals_one_predict(
    binary: Path, predict_models: dict[str, Path], tmp_path: Path
) -> None:
    """The predict stage: 3 `predict --input-shard` jobs, `merge` of their scores, `results`: the
    files of one `predict` over the same inputs, byte for byte (one frame a pack, so each frame is
    computed alone in the shards as in the single run)."""
    snakemake = snakemake_command()
    lam = "".join(ln.strip() for ln in (FIXTURES / "lambda_virus.fa").read_text().splitlines()[1:])
    fasta = tmp_path / "lambda_parts.fa"
    fasta.write_text(
        "".join(f">lam_{k}\n{lam[k * 3000 : k * 3000 + 1500 + 300 * k]}\n" for k in range(5)) + ">n\nNNNN\n"
    )
    flags = ["--ep", "cpu", "--chunk", "300", "--toks-per-batch", "102", "--threads", "1"]
    m = predict_models
    config = tmp_path / "config.yaml"
    config.write_text(
        f"stages: [predict]\ninputs: [{fasta}]\nesm: {m['esm']}\ndnabert: {m['dnabert']}\n"
        f"classifier: {m['classifier']}\nshards: 3\npredict_out: out/predict\nparts_dir: out/parts\n"
        f"binary: {binary}\npredict_args: {flags}\nthreads: 1\ngpus: 0\n"
    )
    cmd = [*snakemake, "-s", ROOT / "workflow" / "Snakefile", "--configfile", config, "--cores", "2"]
    r = run([*cmd, "--directory", tmp_path, "--quiet", "rules"])
    assert r.returncode == 0, f"snakemake failed:\n{r.stdout}\n{r.stderr}"
    got = tmp_path / "out" / "predict"
    for i in range(3):
        report = tmp_path / "out" / "parts" / "predict" / f"part{i}" / "predict_report.json"
        assert json.loads(report.read_text())["input_shard"] == f"{i}/3"
    single = tmp_path / "single"
    r = run(
        [
            binary, "predict", fasta, "--esm", m["esm"], "--dnabert", m["dnabert"], "--classifier",
            m["classifier"], "--out-dir", single, "-q", *flags,
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in (
        "prediction_results.txt",
        "prediction_results_highestscore.csv",
        "prediction_verdicts.tsv",
        "prediction_scores.h5",
    ):
        assert (got / name).read_bytes() == (single / name).read_bytes(), f"{name} differs"
    assert len((got / "prediction_verdicts.tsv").read_text().splitlines()) == 1 + 6
