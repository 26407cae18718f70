"""`predict` scaled out, end to end on the CPU: `--devices cpu:2` writes the files of one process
byte for byte (also with a worker killed by the fault switch, and after kill -9 and `--resume`);
`--input-shard` over 3 shards, `merge` of their scores and `results` give the files of the whole run
byte for byte; `merge` refuses wrong sets of predict parts and `results` scores of another input.

Input: lambda cut into records of 0.7-4 kb in two files, with a record of Ns and a 2 bp one (no
stop-free frame). Models: random ESM-2 8M, 2-layer DNABERT-S and classifier (conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import virnucpro_reference as ref
from e2e_helpers import FIXTURES, Exported, run

TEXT_FILES = ("prediction_results.txt", "prediction_results_highestscore.csv", "prediction_verdicts.tsv")
SCORES = "prediction_scores.h5"
BASE = ["--chunk", "300", "--shard-sequences", "4", "--threads", "1"]
# Packs of several frames (the devices tests: the same packs as one process).
PACKED = [*BASE, "--toks-per-batch", "512"]
# One frame a pack (a 300 bp chunk's protein is 102 tokens; two DNA spans are more): every frame is
# computed alone wherever it runs, so a shard's scores are the whole run's to the bit. (With packs of
# several frames the shards' packs differ from the whole run's and the scores agree to float32
# rounding only, as for `embed`.)
ALONE = [*BASE, "--toks-per-batch", "102"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    lam = ref.read_fasta(FIXTURES / "lambda_virus.fa")[0][1]
    d = tmp_path_factory.mktemp("inputs")
    first = [
        ("lam_a", lam[0:2000]),
        ("lam_b", lam[3000:6500]),
        ("all_n", "N" * 700),
        ("lam_c", lam[8000:9200]),
    ]
    second = [
        ("lam_d", lam[10000:10700]),
        ("tiny", "AC"),
        ("lam_e", lam[12000:16000]),
        ("lam_f", lam[20000:22500]),
        ("lam_g", lam[30000:31800]),
    ]
    paths = []
    for name, records in (("a.fa", first), ("b.fa", second)):
        p = d / name
        p.write_text("".join(f">{i} lambda part\n{s}\n" for i, s in records))
        paths.append(p)
    return paths


def predict_cmd(
    binary: Path, models: dict[str, Path], inputs: list[Path], out: Path, *extra: object
) -> list[str | Path]:
    return [
        binary, "predict", *inputs, "--esm", models["esm"], "--dnabert", models["dnabert"],
        "--classifier", models["classifier"], "--out-dir", out, "--ep", "cpu", "-q", *map(str, extra),
    ]  # fmt: skip


def predict(
    binary: Path,
    models: dict[str, Path],
    inputs: list[Path],
    out: Path,
    *extra: object,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return run(predict_cmd(binary, models, inputs, out, *extra), env={**os.environ, **(env or {})})


def same_files(got: Path, want: Path, names: tuple[str, ...] = (*TEXT_FILES, SCORES)) -> list[str]:
    """The names of the files that differ (bytes)."""
    return [n for n in names if (got / n).read_bytes() != (want / n).read_bytes()]


def single_run(
    binary: Path,
    models: dict[str, Path],
    inputs: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    args: list[str],
) -> tuple[Path, dict[str, Any]]:
    """One single-process predict run (the reference of the tests below) and its report."""
    out = tmp_path_factory.mktemp("single") / name
    r = predict(binary, models, inputs, out, *args)
    assert r.returncode == 0, r.stderr
    return out, json.loads((out / "predict_report.json").read_text())


@pytest.fixture(scope="module")
def single_packed(
    binary: Path,
    predict_models: dict[str, Path],
    inputs: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    out, report = single_run(binary, predict_models, inputs, tmp_path_factory, "packed", PACKED)
    # Enough work for two workers and for a kill in the middle: several packs of several frames.
    assert report["frames"] > 60 and report["esm_engine"]["packs"] >= 6, report
    assert report["records_without_frames"] == 2 and report["records"] == 9
    return out


@pytest.fixture(scope="module")
def single_alone(
    binary: Path,
    predict_models: dict[str, Path],
    inputs: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    out, report = single_run(binary, predict_models, inputs, tmp_path_factory, "alone", ALONE)
    assert report["esm_engine"]["packs"] == report["dnabert_engine"]["packs"] == report["frames"], report
    return out


def test_two_cpu_workers_write_the_single_process_files(
    binary: Path, predict_models: dict[str, Path], inputs: list[Path], single_packed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two"
    r = predict(binary, predict_models, inputs, out, *PACKED, "--devices", "cpu:2")
    assert r.returncode == 0, r.stderr
    assert not same_files(out, single_packed), "--devices cpu:2 changed the outputs"
    report = json.loads((out / "predict_report.json").read_text())
    devices = report["devices"]
    assert [d["device"] for d in devices] == ["cpu-worker-0", "cpu-worker-1"]
    # Both models' packs went through the workers, every one once.
    packs = report["esm_engine"]["packs"] + report["dnabert_engine"]["packs"]
    assert sum(d["packs"] for d in devices) == packs, devices
    assert sum(d["sequences"] for d in devices) == 2 * report["frames"], devices
    assert all(d["packs"] > 0 and d["restarts"] == 0 and not d["failed"] for d in devices), devices
    assert report["data"]["complete"] is True
    single = json.loads((single_packed / "predict_report.json").read_text())
    assert "devices" not in single
    # GPU lists need a GPU provider; CPU workers need --ep cpu.
    r = predict(binary, predict_models, inputs, tmp_path / "x", *PACKED, "--devices", "0,1")
    assert r.returncode == 2 and "cpu:N" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("fault", "failed"), [("1:2", False), ("1:1:every", True)])
def test_a_killed_worker_is_restarted_once_then_its_share_goes_to_the_others(
    binary: Path,
    predict_models: dict[str, Path],
    inputs: list[Path],
    single_packed: Path,
    tmp_path: Path,
    fault: str,
    failed: bool,
) -> None:
    out = tmp_path / "fault"
    r = predict(
        binary,
        predict_models,
        inputs,
        out,
        *PACKED,
        "--devices",
        "cpu:2",
        env={"VIRNUC_FAULT_KILL_WORKER": fault},
    )
    assert r.returncode == 0, r.stderr
    assert not same_files(out, single_packed), f"fault {fault}: the outputs differ"
    report = json.loads((out / "predict_report.json").read_text())
    w1 = report["devices"][1]
    assert w1["device"] == "cpu-worker-1" and w1["restarts"] == 1 and w1["failed"] is failed, w1
    assert len(w1["deaths"]) == (2 if failed else 1), w1
    assert r.stderr.count("worker on cpu-worker-1 died") == len(w1["deaths"]), r.stderr
    assert report["frames"] == json.loads((single_packed / "predict_report.json").read_text())["frames"]


def test_every_worker_dying_fails_without_output(
    binary: Path, predict_models: dict[str, Path], inputs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "dead"
    r = predict(
        binary,
        predict_models,
        inputs,
        out,
        *PACKED,
        "--devices",
        "cpu:1",
        env={"VIRNUC_FAULT_KILL_WORKER": "0:1:every"},
    )
    assert r.returncode == 5, r.stderr  # the engines could not run
    assert "every device worker died" in r.stderr, r.stderr
    assert not any((out / n).exists() for n in (*TEXT_FILES, SCORES))
    # Nothing was durable (fewer frames than a shard): no working folder is left to trip over.
    assert not list(out.glob("*.partial")), sorted(p.name for p in out.iterdir())


def test_kill_and_resume_with_devices_give_the_single_process_files(
    binary: Path, predict_models: dict[str, Path], inputs: list[Path], single_packed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    cmd = predict_cmd(binary, predict_models, inputs, out, *PACKED, "--devices", "cpu:2")
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / f"{SCORES}.partial"
    deadline = time.monotonic() + 120
    # Kill once two shards of 4 frames are durable.
    while time.monotonic() < deadline and p.poll() is None:
        if journal.exists() and len(list(journal.glob("shard-*"))) >= 2:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / TEXT_FILES[0]).exists()
    r = run([*cmd, "--resume"])
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "predict_report.json").read_text())
    assert report["resumed"] and 0 < report["frames_this_run"] < report["frames"], report
    assert not same_files(out, single_packed), "kill -9 + --resume with --devices changed the outputs"


def shard_parts(
    binary: Path, models: dict[str, Path], inputs: list[Path], base: Path, *extra: object, n: int = 3
) -> list[Path]:
    parts = []
    for i in range(n):
        out = base / f"part{i}"
        r = predict(binary, models, inputs, out, *ALONE, "--input-shard", f"{i}/{n}", *extra)
        assert r.returncode == 0, r.stderr
        parts.append(out)
    return parts


def test_three_shards_merged_give_the_whole_run_files(
    binary: Path, predict_models: dict[str, Path], inputs: list[Path], single_alone: Path, tmp_path: Path
) -> None:
    parts = shard_parts(binary, predict_models, inputs, tmp_path)
    # Each shard's own files cover its records: record positions count across both input files.
    names = [ln.split("\t")[0] for ln in (single_alone / TEXT_FILES[2]).read_text().splitlines()[1:]]
    for i, part in enumerate(parts):
        report = json.loads((part / "predict_report.json").read_text())
        assert report["input_shard"] == f"{i}/3"
        mine = [ln.split("\t")[0] for ln in (part / TEXT_FILES[2]).read_text().splitlines()[1:]]
        assert mine == names[i::3], (i, mine)
    merged = tmp_path / "all"
    merged.mkdir()
    r = run(
        [binary, "merge", *(p / SCORES for p in reversed(parts)), "-o", merged / SCORES, "--block-rows", "5"]
    )
    assert r.returncode == 0, r.stderr
    r = run([binary, "results", *inputs, "--scores", merged / SCORES, "--out-dir", merged])
    assert r.returncode == 0, r.stderr
    assert "9 records" in r.stderr and "2 records without a stop-free frame" in r.stderr, r.stderr
    assert not same_files(merged, single_alone), "merged shards differ from the whole run"
    # `results` on the whole run's own scores rewrites its files (one writer for both).
    again = tmp_path / "again"
    r = run([binary, "results", *inputs, "--scores", single_alone / SCORES, "--out-dir", again])
    assert r.returncode == 0, r.stderr
    assert not same_files(again, single_alone, TEXT_FILES)
    # ... and refuses to overwrite them.
    r = run([binary, "results", *inputs, "--scores", single_alone / SCORES, "--out-dir", again])
    assert r.returncode == 4 and "already exists" in r.stderr, r.stderr


def test_merge_and_results_refuse_wrong_predict_parts(
    binary: Path,
    predict_models: dict[str, Path],
    models: dict[str, Exported],
    inputs: list[Path],
    tmp_path: Path,
) -> None:
    parts = [p / SCORES for p in shard_parts(binary, predict_models, inputs, tmp_path)]
    bad = tmp_path / "bad.h5"
    # A shard missing.
    r = run([binary, "merge", parts[0], parts[2], "-o", bad])
    assert r.returncode == 3 and "1/3" in r.stderr and "missing" in r.stderr, r.stderr
    # A shard given twice.
    r = run([binary, "merge", *parts, parts[1], "-o", bad])
    assert r.returncode == 3 and "given twice" in r.stderr, r.stderr
    # An embed part among predict parts.
    embed_part = tmp_path / "embed1.h5"
    r = run(
        [
            binary, "embed", *inputs, "--model", models["virnuc"].path, "--out", embed_part, "--ep", "cpu",
            "-q", "--chunk", "300", "--input-shard", "1/3",
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run([binary, "merge", parts[0], embed_part, parts[2], "-o", bad])
    assert r.returncode == 3 and "predict scores vs embeddings" in r.stderr, r.stderr
    # A shard of other settings (token budget), and of another split.
    other = tmp_path / "other"
    r = predict(
        binary, predict_models, inputs, other, *BASE, "--toks-per-batch", "200", "--input-shard", "1/3"
    )
    assert r.returncode == 0, r.stderr
    r = run([binary, "merge", parts[0], other / SCORES, parts[2], "-o", bad])
    assert r.returncode == 3 and "token_budget" in r.stderr, r.stderr
    split2 = tmp_path / "split2"
    r = predict(binary, predict_models, inputs, split2, *ALONE, "--input-shard", "1/2")
    assert r.returncode == 0, r.stderr
    r = run([binary, "merge", parts[0], split2 / SCORES, parts[2], "-o", bad])
    assert r.returncode == 3 and "shard count" in r.stderr, r.stderr
    assert not bad.exists()
    # `results`: scores of another input, an embed file, a shard's scores read as a whole input.
    merged = tmp_path / "merged.h5"
    assert run([binary, "merge", *parts, "-o", merged]).returncode == 0
    r = run([binary, "results", inputs[1], "--scores", merged, "--out-dir", tmp_path / "r1"])
    assert r.returncode == 3 and "not the scores of this input" in r.stderr, r.stderr
    assert not (tmp_path / "r1" / TEXT_FILES[0]).exists()
    r = run([binary, "results", *inputs, "--scores", embed_part, "--out-dir", tmp_path / "r2"])
    assert r.returncode == 3 and "not a predict scores file" in r.stderr, r.stderr
    # A shard's scores know their shard: `results` reads only its records (its own files again).
    r = run([binary, "results", *inputs, "--scores", parts[1], "--out-dir", tmp_path / "r3"])
    assert r.returncode == 0 and "input shard 1/3 only" in r.stderr, r.stderr
    assert not same_files(tmp_path / "r3", parts[1].parent, TEXT_FILES)


def test_shards_with_packs_of_several_frames_agree_to_float32_rounding(
    binary: Path, predict_models: dict[str, Path], inputs: list[Path], single_packed: Path, tmp_path: Path
) -> None:
    """Packs of several frames: a shard's packs hold other frames than the whole run's, so scores
    agree to float32 rounding; ids, order, the verdict columns other than the scores and the files'
    shapes are the whole run's exactly."""
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}"
        r = predict(binary, predict_models, inputs, out, *PACKED, "--input-shard", f"{i}/3")
        assert r.returncode == 0, r.stderr
        parts.append(out / SCORES)
    merged = tmp_path / "all"
    merged.mkdir()
    assert run([binary, "merge", *parts, "-o", merged / SCORES]).returncode == 0
    r = run([binary, "results", *inputs, "--scores", merged / SCORES, "--out-dir", merged])
    assert r.returncode == 0, r.stderr
    got = ref.read_results_as_pandas(merged / TEXT_FILES[0])
    want = ref.read_results_as_pandas(single_packed / TEXT_FILES[0])
    assert [g[0] for g in got] == [w[0] for w in want]
    worst = max(max(abs(g[2] - w[2]), abs(g[3] - w[3])) for g, w in zip(got, want, strict=True))
    assert worst < 1e-5, worst
    verdicts = [
        [ln.split("\t")[:5] for ln in (d / TEXT_FILES[2]).read_text().splitlines()]
        for d in (merged, single_packed)
    ]
    assert verdicts[0] == verdicts[1]
