"""The harness's own arithmetic: workloads, run selection, cosines matched by id, the table."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import report
import run
import workloads
from peers import read_fasta, write_embeddings_h5


def test_broad_workload_is_seeded_and_within_bounds(tmp_path: Path):
    a = workloads.broad(tmp_path / "a.fa", 20_000, seed=4)
    b = workloads.broad(tmp_path / "b.fa", 20_000, seed=4)
    c = workloads.broad(tmp_path / "c.fa", 20_000, seed=5)
    ra, rb, rc = read_fasta(a.path), read_fasta(b.path), read_fasta(c.path)
    assert ra == rb and ra != rc
    lengths = [len(s) + 2 for _, s in ra]
    assert a.tokens == sum(lengths) >= 20_000
    assert sum(lengths) - lengths[-1] < 20_000  # stops at the first sequence that reaches the target
    assert min(lengths) >= 50 and max(lengths) <= 1024
    assert len(set(lengths)) > len(lengths) // 3  # a spread of lengths, not one value


def test_chunk500_sample_reaches_target_in_pool_order(tmp_path: Path):
    pool = tmp_path / "pool.fa"
    recs = [(f"c{i}_chunk_1F{1 + i % 3}", "M" * (20 + i % 150)) for i in range(400)]
    workloads.write_fasta(pool, recs)
    w = workloads.chunk500(pool, tmp_path / "w.fa", 5_000, seed=1)
    got = read_fasta(w.path)
    assert w.tokens >= 5_000 and w.tokens == sum(len(s) + 2 for _, s in got)
    index = [recs.index(r) for r in got]
    assert index == sorted(index) and len(index) < len(recs)


def test_chunk500_without_binary_fails_clearly(tmp_path: Path):
    with pytest.raises(workloads.WorkloadError, match="cargo build --release -p virnuc-trt"):
        workloads.translate_pool(tmp_path / "no-such-binary", [], tmp_path / "pool.fa")


def test_cosines_match_by_id_and_detect_a_difference(tmp_path: Path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 8)).astype(np.float32)
    ids = [f"s{i}" for i in range(6)]
    lengths = np.full(6, 10)
    write_embeddings_h5(tmp_path / "ref.h5", ids, emb, lengths)
    order = [3, 1, 5, 0, 2, 4]
    write_embeddings_h5(tmp_path / "same.h5", [ids[i] for i in order], emb[order], lengths)
    lo, mean, n = report.cosines(tmp_path / "ref.h5", tmp_path / "same.h5")
    assert n == 6 and lo == pytest.approx(1.0, abs=1e-12) and mean == pytest.approx(1.0, abs=1e-12)
    bad = emb.copy()
    bad[2] = rng.standard_normal(8)
    write_embeddings_h5(tmp_path / "bad.h5", ids, bad, lengths)
    lo, mean, _ = report.cosines(tmp_path / "ref.h5", tmp_path / "bad.h5")
    assert lo < 0.9 and mean < 1.0


def _args(**kw: str | None) -> argparse.Namespace:
    base = {"precisions": None, "peers": None, "virnuc_attention": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_selection_by_precision_and_pins():
    gpu = run.expand_runs(_args(), cuda=True)
    assert [(r.tool, r.precision) for r in gpu] == [
        ("virnuc-trt", "fp32"),
        ("virnuc-trt", "fp16"),
        ("hf-eager", "fp32"),
        ("hf-sdpa", "fp16"),
        ("torch-packed", "fp16"),
    ]
    fp16 = run.expand_runs(_args(precisions="fp16"), cuda=True)
    assert {(r.tool, r.precision) for r in fp16} == {
        ("virnuc-trt", "fp16"),
        ("hf-sdpa", "fp16"),
        ("torch-packed", "fp16"),
    }
    pinned = run.expand_runs(_args(peers="hf-sdpa:fp32,virnuc-trt", precisions="fp16"), cuda=True)
    assert {(r.tool, r.precision) for r in pinned} == {("hf-sdpa", "fp32"), ("virnuc-trt", "fp16")}
    cpu = run.expand_runs(_args(), cuda=False)
    assert {(r.tool, r.precision, r.attention) for r in cpu} == {
        ("virnuc-trt", "fp32", "virnuc"),
        ("hf-eager", "fp32", ""),
        ("hf-sdpa", "fp32", ""),
    }
    with pytest.raises(SystemExit):
        run.expand_runs(_args(peers="fair-esm"), cuda=True)


def test_table_rows_and_ratios():
    rows = [
        {"model": "m", "workload": "w", "tool": "virnuc-trt", "precision": "fp16", "tok_s": 300.0},
        {"model": "m", "workload": "w", "tool": "torch-packed", "precision": "fp16", "tok_s": 200.0},
        {"model": "m", "workload": "w", "tool": "virnuc-trt", "precision": "fp32", "tok_s": 90.0},
        {"model": "m", "workload": "w", "tool": "hf-eager", "precision": "fp32", "tok_s": 30.0},
    ]
    assert report.ratios(rows) == [
        "m w virnuc-trt fp16 / torch-packed = 1.50x",
        "m w virnuc-trt fp32 / hf-eager = 3.00x",
    ]


def test_virnuc_report_load_time_is_engine_open_plus_warmup():
    from virnuc import load_seconds

    report_json = {"engine_open_s": 2.5, "warmup_s": 0.75, "wall_s": 9.0, "data": {"records_read": 3}}
    assert load_seconds(report_json) == pytest.approx(3.25)
    assert load_seconds({"wall_s": 9.0}) is None


def test_the_default_binary_is_the_newer_build(tmp_path: Path) -> None:
    staged, built = tmp_path / "stage" / "virnuc-trt", tmp_path / "release" / "virnuc-trt"
    assert run.default_binary(staged, built) == built  # neither: the path the error names
    staged.parent.mkdir()
    staged.write_bytes(b"old")
    assert run.default_binary(staged, built) == staged
    built.parent.mkdir()
    built.write_bytes(b"new")
    os.utime(staged, (1_000, 1_000))
    assert run.default_binary(staged, built) == built  # a rebuild after `prepare` wins
    os.utime(built, (500, 500))
    assert run.default_binary(staged, built) == staged
    assert "sha256 " in run.binary_identity(built)
    assert run.binary_identity(tmp_path / "nope").endswith("(missing)")


def test_rounds_alternate_the_order_of_the_tools():
    runs = run.expand_runs(_args(), cuda=False)
    assert run.round_order(runs, 0) == runs
    assert run.round_order(runs, 1) == list(reversed(runs))
    assert run.round_order(runs, 2) == runs


def _row(tool: str, seconds: float, rnd: int, **kw: object) -> dict[str, object]:
    base = {"model": "m", "workload": "w", "tool": tool, "precision": "fp32", "budget": 2048}
    base |= {"attention": "x", "tokens": 1000, "sequences": 10, "seconds": seconds, "round": rnd}
    base |= {"padding_pct": 0.0}
    if "error" not in kw:
        base |= {"tok_s": 1000 / seconds, "seq_s": 10 / seconds, "limit_pct": 50.0 * 2.0 / seconds}
    return base | kw


def test_rounds_give_min_and_median_per_tool():
    rows = [
        _row("a", 4.0, 0, output="a0"),
        _row("b", 2.0, 0),
        _row("b", 3.0, 1),
        _row("a", 1.0, 1, output="a1"),
        _row("a", 2.0, 2, output="a2"),
        _row("b", 0.0, 2, error="boom"),
    ]
    a, b = run.aggregate_rounds(rows)
    assert (a["tool"], a["rounds"], a["round_seconds"]) == ("a", 3, [4.0, 1.0, 2.0])
    assert a["seconds"] == 2.0 and a["seconds_min"] == 1.0
    assert a["tok_s"] == pytest.approx(500.0) and a["tok_s_best"] == pytest.approx(1000.0)
    assert a["seq_s"] == pytest.approx(5.0) and a["limit_pct"] == pytest.approx(50.0)
    assert a["output"] == "a2" and "round" not in a  # the median round's own figures
    # An even count: the median is the mean of the middle two; a failed round is counted, not timed.
    assert b["seconds"] == 2.5 and b["seconds_min"] == 2.0 and b["failed_rounds"] == 1
    only_errors = run.aggregate_rounds([_row("c", 0.0, 0, error="x"), _row("c", 0.0, 1, error="y")])
    assert len(only_errors) == 1 and only_errors[0]["error"] == "y"
    md = report.markdown(
        {
            "context": {
                "mode": "cpu",
                "device": {"name": "cpu", "driver": "-"},
                "date": "d",
                "command": "c",
                "software": "s",
                "seed": 1,
                "rounds": 3,
                "ceiling_tflops": 0.1,
                "limits": {},
                "workloads": {},
            },
            "rows": [a],
        }
    )
    assert "3 alternating rounds" in md and "500 (best 1.0k)" in md and "2.0 (min 1.0)" in md


def test_a_fresh_clone_has_the_chunk500_genomes():
    # The default data folder is inside the repository, not ../shared.
    assert run.DEFAULT_DATA.is_relative_to(run.REPO)
    for g in workloads.GENOMES:
        assert (run.DEFAULT_DATA / g).stat().st_size > 40_000, g
