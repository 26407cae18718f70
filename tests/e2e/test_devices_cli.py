"""`embed --devices` end to end with CPU worker processes (`cpu:N`): the file equals a single
process's byte for byte, also with a worker killed by the fault switch (once: restarted; twice: the
others take its share, the report names it) and after the whole command is killed and resumed; a
run whose every worker dies fails and writes no output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e_helpers import FIXTURES, Exported, run

INPUT = FIXTURES / "virnucpro_synthetic.fa"
ARGS = ["--chunk", "300", "--toks-per-batch", "512", "--shard-sequences", "4", "--threads", "1"]


def embed(
    binary: Path, model: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [binary, "embed", INPUT, "--model", model, "--out", out, "--ep", "cpu", "-q", *ARGS, *extra]
    return run(cmd, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def single(binary: Path, models: dict[str, Exported], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "one.h5"
    r = embed(binary, models["virnuc"].path, out)
    assert r.returncode == 0, r.stderr
    return out


def test_two_cpu_workers_write_the_single_process_file(
    binary: Path, models: dict[str, Exported], single: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two.h5"
    r = embed(binary, models["virnuc"].path, out, "--devices", "cpu:2")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == single.read_bytes(), "--devices cpu:2 changed the file"
    report = json.loads(r.stdout)
    devices = report["devices"]
    assert [d["device"] for d in devices] == ["cpu-worker-0", "cpu-worker-1"]
    assert sum(d["packs"] for d in devices) == report["packs"]
    assert sum(d["sequences"] for d in devices) == report["sequences"]
    assert all(d["packs"] > 0 and d["restarts"] == 0 and not d["failed"] for d in devices), devices
    r = embed(binary, models["virnuc"].path, tmp_path / "x.h5", "--devices", "0,1")
    assert r.returncode == 2 and "cpu:N" in r.stderr, r.stderr


@pytest.mark.parametrize(("fault", "failed"), [("1:2", False), ("1:1:every", True)])
def test_a_killed_worker_is_restarted_once_then_its_share_goes_to_the_others(
    binary: Path, models: dict[str, Exported], single: Path, tmp_path: Path, fault: str, failed: bool
) -> None:
    out = tmp_path / "fault.h5"
    r = embed(
        binary, models["virnuc"].path, out, "--devices", "cpu:2", env={"VIRNUC_FAULT_KILL_WORKER": fault}
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == single.read_bytes(), f"fault {fault}: the file differs"
    w1 = json.loads(r.stdout)["devices"][1]
    assert w1["restarts"] == 1 and w1["failed"] is failed, w1
    assert len(w1["deaths"]) == (2 if failed else 1), w1
    assert r.stderr.count("worker on cpu-worker-1 died") == len(w1["deaths"]), r.stderr


def test_every_worker_dying_fails_without_output(
    binary: Path, models: dict[str, Exported], tmp_path: Path
) -> None:
    out = tmp_path / "dead.h5"
    r = embed(
        binary,
        models["virnuc"].path,
        out,
        "--devices",
        "cpu:1",
        env={"VIRNUC_FAULT_KILL_WORKER": "0:1:every"},
    )
    assert r.returncode == 5, r.stderr  # the engines could not run
    assert "every device worker died" in r.stderr, r.stderr
    assert not out.exists()


def test_kill_and_resume_with_devices_gives_the_single_process_file(
    binary: Path, models: dict[str, Exported], single: Path, tmp_path: Path
) -> None:
    model = models["virnuc"].path
    out = tmp_path / "resumed.h5"
    cmd = [
        binary,
        "embed",
        INPUT,
        "--model",
        model,
        "--out",
        out,
        "--ep",
        "cpu",
        "-q",
        *ARGS,
        "--devices",
        "cpu:2",
    ]
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = Path(f"{out}.partial") / "journal"
    deadline = time.monotonic() + 120
    # Kill once at least two shards are durable (journal: header + shard lines).
    while time.monotonic() < deadline and p.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()
    r = run([*cmd, "--resume"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["resumed"] and 0 < report["sequences_this_run"] < report["sequences"], report
    assert out.read_bytes() == single.read_bytes(), "kill + resume with --devices changed the file"
