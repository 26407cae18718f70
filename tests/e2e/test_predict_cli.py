"""`virnuc-trt predict` end to end on the CPU against VirNucPro's prediction math restated in numpy
(tests/e2e/virnucpro_reference.py): random DNABERT-S (2 layers), random ESM-2 8M, random classifier for
768 + 320; lambda and Klebsiella; VirNucPro's file formats read back as pandas reads them; kill -9 and
--resume; bad inputs."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import virnucpro_reference as ref
from e2e_helpers import FIXTURES, run

LAMBDA = FIXTURES / "lambda_virus.fa"
KLEBSIELLA = FIXTURES / "klebsiella_HS11286_32kb.fa"
OUTPUTS = (
    "prediction_results.txt",
    "prediction_results_highestscore.csv",
    "prediction_verdicts.tsv",
    "prediction_scores.h5",
)


def predict(binary: Path, models: dict[str, Path], inputs: list[Path], out: Path, *extra: object):
    cmd = [
        binary, "predict", *inputs, "--esm", models["esm"], "--dnabert", models["dnabert"],
        "--classifier", models["classifier"], "--out-dir", out, "--ep", "cpu", "-q", *extra,
    ]  # fmt: skip
    if "--toks-per-batch" not in extra:
        # The masked flavor's attention is O(T²) per pack: small packs keep the CPU run short.
        cmd += ["--toks-per-batch", "512"]
    return run(cmd)


NUMBER = r"(?:-?\d+\.\d+(?:e[+-]\d\d)?|-?\d(?:\.\d+)?e[+-]\d\d|nan|-?inf)"


@pytest.mark.parametrize(("fasta", "chunk"), [(LAMBDA, 500), (KLEBSIELLA, 300)], ids=["lambda", "klebsiella"])
def test_predictions_equal_virnucpro_math(
    binary: Path, predict_models: dict[str, Path], tmp_path: Path, fasta: Path, chunk: int
) -> None:
    out = tmp_path / "out"
    r = predict(binary, predict_models, [fasta], out, "--chunk", chunk)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr

    ids, probs = ref.predict(
        fasta, chunk, predict_models["esm"], predict_models["dnabert"], predict_models["classifier"]
    )
    assert len(ids) > 40
    want_txt = ref.results_text(ids, probs)
    got_txt = (out / "prediction_results.txt").read_text()
    got_rows = ref.read_results_as_pandas(out / "prediction_results.txt")
    want_rows = [
        (i, lab, float(a), float(b)) for i, lab, a, b in (ln.split("\t") for ln in want_txt.splitlines()[1:])
    ]
    # Identical ids in identical order; scores within 1e-5; labels identical (a flip only at a near-tie).
    assert [g[0] for g in got_rows] == [w[0] for w in want_rows]
    worst = max(max(abs(g[2] - w[2]), abs(g[3] - w[3])) for g, w in zip(got_rows, want_rows, strict=True))
    assert worst < 1e-5, f"max |score - reference| = {worst}"
    flips = [
        g[0] for g, w in zip(got_rows, want_rows, strict=True) if g[1] != w[1] and abs(w[2] - w[3]) > 2e-5
    ]
    assert not flips, flips
    labels = {g[1] for g in got_rows}
    assert labels == {"virus", "others"}, "random weights should give both labels"

    # Format: VirNucPro's header, tabs, newline-terminated, scores as numpy float32 str().
    lines = got_txt.split("\n")
    assert lines[0] == "Sequence_ID\tPrediction\tscore1\tscore2" and lines[-1] == ""
    for line in lines[1:-1]:
        sid, lab, s1, s2 = line.split("\t")
        assert re.fullmatch(r"\S+_chunk_\d+[FR][123]", sid) and lab in ("virus", "others")
        for s in (s1, s2):
            assert re.fullmatch(NUMBER, s) and str(np.float32(s)) == s, s
    # Scores agree to the printed digits with the reference wherever both print the same float32.
    same = sum(g == w for g, w in zip(got_txt.splitlines(), want_txt.splitlines(), strict=True))
    assert same > 0

    # prediction_results_highestscore.csv: what VirNucPro's pandas step makes of our own txt, exactly,
    # and the reference's verdicts per chunk (up to near-ties).
    got_csv = (out / "prediction_results_highestscore.csv").read_text()
    assert got_csv == ref.highestscore_text(got_rows)
    # And pandas itself, running VirNucPro's code on our txt, reads the same rows and writes our csv.
    pandas_rows, pandas_csv = ref.highestscore_by_pandas(out / "prediction_results.txt")
    assert pandas_rows == got_rows
    assert pandas_csv == got_csv
    want_csv = ref.highestscore_text(want_rows)
    chunks_got = dict(ln.split("\t") for ln in got_csv.splitlines()[1:])
    chunks_want = dict(ln.split("\t") for ln in want_csv.splitlines()[1:])
    assert list(chunks_got) == list(chunks_want) == sorted(chunks_want)
    maxima: dict[str, list[float]] = {}
    for sid, _, s1, s2 in want_rows:
        m = maxima.setdefault(sid[:-2], [-1.0, -1.0])
        m[0], m[1] = max(m[0], s1), max(m[1], s2)
    differ = [
        k for k in chunks_got if chunks_got[k] != chunks_want[k] and abs(maxima[k][0] - maxima[k][1]) > 2e-5
    ]
    assert not differ, differ
    # The string sort VirNucPro's pandas groupby gives (`_chunk_10` before `_chunk_2`), not numeric.
    keys = list(chunks_got)
    nums = [int(k.rsplit("_", 1)[1]) for k in keys]
    assert keys == sorted(keys) and nums != sorted(nums)

    # Verdicts: one line per input record, frames adding up to the txt.
    verdicts = (out / "prediction_verdicts.tsv").read_text().splitlines()
    header = verdicts[0].split("\t")
    rows = [dict(zip(header, ln.split("\t"), strict=True)) for ln in verdicts[1:]]
    assert [v["record_id"] for v in rows] == [i for i, _ in ref.read_fasta(fasta)]
    assert sum(int(v["frames"]) for v in rows) == len(got_rows)
    for v in rows:
        mine = [g for g in got_rows if g[0].startswith(v["record_id"] + "_chunk_")]
        assert int(v["frames"]) == len(mine)
        assert np.float32(v["max_p_virus"]) == np.float32(max(g[3] for g in mine))
        viral = sum(chunks_got[k] == "True" for k in chunks_got if k.startswith(v["record_id"] + "_chunk_"))
        assert int(v["viral_chunks"]) == viral
    report = json.loads((out / "predict_report.json").read_text())
    assert report["frames"] == len(got_rows) and report["records"] == len(rows)
    assert report["random_weights"] is True and report["data"]["complete"] is True


def test_records_without_a_frame_are_listed(binary: Path, predict_models: dict[str, Path], tmp_path: Path):
    lam = ref.read_fasta(LAMBDA)[0][1]
    fasta = tmp_path / "mixed.fa"
    fasta.write_text(
        f">part1 lambda\n{lam[:1800]}\n>all_n\n{'N' * 700}\n>tiny\nAC\n>part2\n{lam[5000:5900]}\n"
    )
    out = tmp_path / "out"
    r = predict(binary, predict_models, [fasta], out, "--chunk", "300")
    assert r.returncode == 0, r.stderr
    verdicts = [ln.split("\t") for ln in (out / "prediction_verdicts.tsv").read_text().splitlines()[1:]]
    assert [v[0] for v in verdicts] == ["part1", "all_n", "tiny", "part2"]
    by_id = {v[0]: v for v in verdicts}
    assert by_id["all_n"][-1] == by_id["tiny"][-1] == "no_frames"
    assert by_id["all_n"][1:4] == ["700", "3", "0"] and by_id["tiny"][1:4] == ["2", "1", "0"]
    assert by_id["part1"][-1] in ("virus", "others") and int(by_id["part1"][3]) > 0
    txt = (out / "prediction_results.txt").read_text()
    assert "all_n" not in txt and "tiny" not in txt  # VirNucPro's files drop them, as VirNucPro does
    report = json.loads((out / "predict_report.json").read_text())
    assert report["records_without_frames"] == 2
    assert report["records_without_frames_first"] == ["all_n", "tiny"]


def test_kill_and_resume_give_the_uninterrupted_outputs(
    binary: Path, predict_models: dict[str, Path], tmp_path: Path
) -> None:
    args = ["--chunk", "300", "--toks-per-batch", "400", "--shard-sequences", "4"]
    part = tmp_path / "lambda_12kb.fa"
    part.write_text(">lambda_12kb\n" + ref.read_fasta(LAMBDA)[0][1][:12000] + "\n")
    whole = tmp_path / "whole"
    started = time.monotonic()
    r = predict(binary, predict_models, [part], whole, *args)
    assert r.returncode == 0, r.stderr
    duration = time.monotonic() - started
    out = tmp_path / "resumed"
    m = predict_models
    base = [
        binary, "predict", part, "--esm", m["esm"], "--dnabert", m["dnabert"], "--classifier",
        m["classifier"], "--out-dir", out, "--ep", "cpu", "-q", *args,
    ]  # fmt: skip
    rng = random.Random(20261201)
    journal = out / "prediction_scores.h5.partial"
    kills = 0
    for attempt in range(4):
        cmd = base + (["--resume"] if attempt > 0 else [])
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill once this attempt has journaled a new shard (model loading takes most of a short run
        # on a busy machine), at a random moment within a fraction of the run's length after it.
        before = len(list(journal.glob("shard-*"))) if journal.exists() else 0
        while p.poll() is None and (len(list(journal.glob("shard-*"))) if journal.exists() else 0) <= before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15) * duration)
        if p.poll() is not None:
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        assert not (out / "prediction_results.txt").exists(), "a killed run left a final file"
    assert kills >= 2, f"only {kills} kills landed mid-run (whole run {duration:.1f} s)"
    r = run([*base, "--resume"])
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "predict_report.json").read_text())
    assert report["resumed"] and 0 < report["frames_this_run"] < report["frames"], report
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), f"{name} differs"
    # A second --resume on the finished folder rewrites the same files from the scores.
    r = run([*base, "--resume"])
    assert r.returncode == 0 and "is complete" in r.stderr, r.stderr
    assert (out / OUTPUTS[0]).read_bytes() == (whole / OUTPUTS[0]).read_bytes()


def test_bad_inputs_fail_clearly_before_any_work(
    binary: Path, predict_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # Classifier for another ESM-2 width: refused with both widths named, nothing written.
    wrong = {**predict_models, "classifier": predict_models["classifier_480"]}
    r = predict(binary, wrong, [LAMBDA], out, "--chunk", "500")
    assert r.returncode == 2 and "768 (DNABERT-S) + 480 (ESM-2)" in r.stderr and "+ 320 (ESM-2)" in r.stderr
    assert not out.exists()
    # Models swapped: a family mismatch.
    swapped = {**predict_models, "esm": predict_models["dnabert"], "dnabert": predict_models["esm"]}
    r = predict(binary, swapped, [LAMBDA], out, "--chunk", "500")
    assert r.returncode == 2 and "not ESM-2" in r.stderr, r.stderr
    for extra, msg in [(["--chunk", "400"], "300 or 500"), ([], "--chunk is required")]:
        r = predict(binary, predict_models, [LAMBDA], out, *extra)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = predict(binary, predict_models, [Path("-")], out, "--chunk", "500")
    assert r.returncode == 2 and "standard input" in r.stderr
    r = predict(binary, predict_models, [tmp_path / "missing.fa"], out, "--chunk", "500")
    # Exit status: an input error (3 in the exit scheme of main.rs; 1 before it).
    assert r.returncode in (1, 3) and "missing.fa" in r.stderr
    bad_gz = tmp_path / "bad.fa.gz"
    bad_gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    r = predict(binary, predict_models, [bad_gz], tmp_path / "o2", "--chunk", "500")
    assert r.returncode in (1, 3) and "bad.fa.gz" in r.stderr, r.stderr
    assert not (tmp_path / "o2" / "prediction_results.txt").exists()
    # A finished folder is not overwritten without --resume.
    done = tmp_path / "done"
    small = tmp_path / "small.fa"
    small.write_text(">s\n" + ref.read_fasta(LAMBDA)[0][1][:700] + "\n")
    assert predict(binary, predict_models, [small], done, "--chunk", "500").returncode == 0
    before = (done / "prediction_results.txt").read_bytes()
    r = predict(binary, predict_models, [small], done, "--chunk", "500")
    assert r.returncode in (1, 4) and "already exists" in r.stderr
    assert (done / "prediction_results.txt").read_bytes() == before
