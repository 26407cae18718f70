"""End-to-end fixtures: the `virnuc-trt` binary and demo-size exported models (see e2e_helpers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from e2e_helpers import MODEL, ROOT, SEED, Exported, run


@pytest.fixture(scope="session")
def binary() -> Path:
    assert os.environ.get("ORT_DYLIB_PATH"), (
        "ORT_DYLIB_PATH is not set: run tools/test.sh or `source tools/setup.sh` first"
    )
    # The dev profile (engine crate optimized, see Cargo.toml): built already by `cargo test`.
    r = run(["cargo", "build", "--quiet", "-p", "virnuc-trt"], cwd=ROOT)
    assert r.returncode == 0, f"cargo build failed:\n{r.stderr}"
    exe = ROOT / "target" / "debug" / "virnuc-trt"
    assert exe.is_file(), exe
    return exe


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """esm2_t6_8M with random weights (seed 0), masked and virnuc flavors, fp32."""
    out: dict[str, Exported] = {}
    base = tmp_path_factory.mktemp("models")
    for flavor in ("masked", "virnuc"):
        d = base / flavor
        r = run(
            [
                sys.executable,
                "-m",
                "virnuc_export",
                "--random",
                MODEL,
                "--seed",
                str(SEED),
                "--attention",
                flavor,
                "--out",
                d,
            ],
            cwd=ROOT / "export",
        )
        assert r.returncode == 0, f"export {flavor} failed:\n{r.stderr}"
        out[flavor] = Exported(flavor, d)
    return out


def export(args: list[str], out: Path) -> Path:
    r = run([sys.executable, "-m", "virnuc_export", *args, "--out", out], cwd=ROOT / "export")
    assert r.returncode == 0, f"export {args} failed:\n{r.stderr}"
    return out


@pytest.fixture(scope="session")
def predict_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`predict`'s three models, random: ESM-2 8M and a 2-layer DNABERT-S (masked-flavor graphs,
    which onnxruntime's Python API runs as they are) and classifiers for 768 + 320 and 768 + 480."""
    d = tmp_path_factory.mktemp("predict_models")
    return {
        "esm": export(["--random", "esm2_t6_8M", "--seed", "0", "--attention", "masked"], d / "esm"),
        "dnabert": export(
            ["--random", "dnabert_s", "--layers", "2", "--seed", "0", "--attention", "masked"], d / "dnabert"
        ),
        # Seed 1: a classifier that calls some lambda frames viral and others not.
        "classifier": export(["--random-classifier", "--esm-dim", "320", "--seed", "1"], d / "clf"),
        "classifier_480": export(["--random-classifier", "--esm-dim", "480", "--seed", "0"], d / "clf480"),
    }
