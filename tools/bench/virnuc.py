"""virnuc-trt in the race: export the random-weight model (timed apart, cached), then `virnuc-trt embed`
as a user runs it, FASTA in → HDF5 out, with its JSON run report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peers import RunStats, read_embeddings_h5

# `virnuc-trt embed --report` keys (runtime/cli/src/embed.rs `EmbedReport`): model load is the engine
# open (session creation) plus the warm-up at the largest pack; both are timed apart, as the peers' are.
_LOAD_KEYS = ("engine_open_s", "warmup_s")


def export_model(
    repo: Path, name: str, seed: int, attention: str, precision: str, out_dir: Path, force: bool = False
) -> float:
    """`python -m virnuc_export --random NAME --seed N ...` into out_dir; seconds taken (0.0 when cached)."""
    if (out_dir / "model.json").exists() and (out_dir / "model.onnx").exists() and not force:
        return 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "virnuc_export",
        "--random",
        name,
        "--seed",
        str(seed),
        "--attention",
        attention,
        "--precision",
        precision,
        "--out",
        str(out_dir),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "export"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("VIRNUC_ROOT", str(repo))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"export failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}{k}.")
            yield k, v
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, prefix)


def report_number(report: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    """The first numeric value under any of `keys`, anywhere in the (nested) report."""
    found = {k: v for k, v in _walk(report) if isinstance(v, int | float) and not isinstance(v, bool)}
    for key in keys:
        if key in found:
            return float(found[key])
    return None


def load_seconds(report: dict[str, Any]) -> float | None:
    """Model load of a `virnuc-trt embed` run: engine open + warm-up (None if the report names neither)."""
    parts = [report_number(report, (k,)) for k in _LOAD_KEYS]
    return sum(x for x in parts if x is not None) if any(x is not None for x in parts) else None


def run_embed(
    binary: Path,
    model_dir: Path,
    fasta: Path,
    out_h5: Path,
    budget: int,
    ep: str,
    extra_args: list[str],
    on_start: Any = None,
) -> tuple[RunStats, list[str], Any, dict[str, Any], float]:
    """One `virnuc-trt embed` run (protein mode: the workload is already translated).

    Returns (stats, ids, embeddings, report, t_start). `stats.seconds` is the wall time minus the model
    load the run report names (when it names one; otherwise `stats.extra["load_in_seconds"]` is True).
    """
    if not binary.exists():
        raise FileNotFoundError(f"{binary}: no virnuc-trt binary (cargo build --release -p virnuc-trt)")
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    report_path = out_h5.with_suffix(".report.json")
    for stale in (out_h5, report_path):
        stale.unlink(missing_ok=True)
    # An interrupted earlier run leaves `<OUT>.partial/`, which embed refuses without --resume.
    shutil.rmtree(out_h5.with_name(out_h5.name + ".partial"), ignore_errors=True)
    cmd = [
        str(binary),
        "embed",
        str(fasta),
        "--model",
        str(model_dir),
        "--out",
        str(out_h5),
        "--mode",
        "protein",
        "--toks-per-batch",
        str(budget),
        "--ep",
        ep,
        "--report",
        str(report_path),
        # The harness exported the model itself a moment ago: hashing a multi-GB model.onnx again only
        # spends device time (it is part of the load, which is timed apart anyway).
        "--skip-hash",
        "--quiet",
        *extra_args,
    ]
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report: dict[str, Any] = {}
    if report_path.exists():
        report = json.loads(report_path.read_text())
    ids, emb = read_embeddings_h5(out_h5)
    load = load_seconds(report)
    busy = report_number(report, ("engine_busy_fraction",))
    stats = RunStats(
        sequences=len(ids),
        tokens=int(report_number(report, ("tokens",)) or -1),
        # Packs are exact (no padding is computed); `padding_tokens` in the report is the unused budget.
        processed_tokens=int(report_number(report, ("tokens",)) or -1),
        batches=int(report_number(report, ("packs",)) or 0),
        seconds=wall - (load or 0.0),
        load_seconds=load or 0.0,
        attention=str(_model_attention(model_dir)),
        extra={
            "load_in_seconds": load is None,
            "wall_seconds": wall,
            "engine_busy_pct": 100.0 * busy if busy is not None else None,
            "reported_tokens_per_s": report_number(report, ("tokens_per_s",)),
            "unused_budget_fraction": report_number(report, ("padding_fraction",)),
            "command": " ".join(cmd),
        },
    )
    return stats, ids, emb, report, t0


def _model_attention(model_dir: Path) -> str:
    try:
        meta = json.loads((model_dir / "model.json").read_text())
        return f"{meta.get('attention', '?')}{'+fused' if meta.get('fused') else ''}"
    except (OSError, ValueError):
        return "?"
