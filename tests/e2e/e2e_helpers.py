"""Helpers of the end-to-end tests: paths, running commands, the HF reference of the exported models.

These tests need the project environment (`source tools/setup.sh`: the venv's torch/transformers,
`ORT_DYLIB_PATH`, cargo); `tools/test.sh` provides it. Without it they fail, they never skip.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = "esm2_t6_8M"
SEED = 0


@dataclass(frozen=True)
class Exported:
    flavor: str
    path: Path


def run(cmd: list[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
    """Runs a command, capturing text output; never raises on a non-zero exit."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def hf_reference(proteins: Path, out: Path) -> dict[str, object]:
    """HF transformers EsmModel, each sequence alone, same random weights as `models`."""
    import numpy as np

    r = run(
        [
            sys.executable,
            "-m",
            "virnuc_export.reference",
            "--random",
            MODEL,
            "--seed",
            str(SEED),
            "--fasta",
            proteins,
            "--out",
            out,
        ],
        cwd=ROOT / "export",
    )
    assert r.returncode == 0, f"reference failed:\n{r.stderr}"
    with np.load(out) as z:
        return {k: z[k] for k in z.files}
