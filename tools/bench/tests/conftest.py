"""The benchmark modules live in tools/bench (a script folder, not a package): make them importable."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
EXPORT = BENCH.parents[1] / "export"
if str(EXPORT) not in sys.path:
    sys.path.insert(0, str(EXPORT))
