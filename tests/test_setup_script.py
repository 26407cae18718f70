"""tools/setup.sh when the install fails: it must stop the caller, and never stamp the venv as done.

It is sourced (`source tools/setup.sh && cargo test`), where bash ignores `set -e`; a version that relied
on errexit wrote the stamp after a failed pip install, and every later run then skipped the install and
failed far from the cause. It must also leave the caller's shell options alone.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checkout_with_lock(tmp_path: Path, lock: str) -> Path:
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "setup.sh", tmp_path / "tools" / "setup.sh")
    (tmp_path / "requirements.txt").write_text(lock)
    return tmp_path


def test_a_failed_install_stops_the_chain_and_writes_no_stamp(tmp_path: Path) -> None:
    # No such version exists (and without a network pip fails the same way): the install must fail.
    checkout = _checkout_with_lock(tmp_path, "six==0.0.999\n")
    script = (
        'opts="$-"; source tools/setup.sh && echo CONTINUED; echo "rc=$?"; '
        '[ "$-" = "$opts" ] && echo SAME_OPTS'
    )
    r = subprocess.run(["bash", "-c", script], cwd=checkout, capture_output=True, text=True, timeout=300)
    assert "CONTINUED" not in r.stdout, r.stdout + r.stderr
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "SAME_OPTS" in r.stdout, r.stdout + r.stderr
    assert "installing requirements.txt into" in r.stderr
    assert not (checkout / ".venv" / ".requirements.sha256").exists()


def test_run_rather_than_sourced_it_exits_non_zero(tmp_path: Path) -> None:
    checkout = _checkout_with_lock(tmp_path, "six==0.0.999\n")
    r = subprocess.run(["bash", "tools/setup.sh"], cwd=checkout, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
