"""requirements.txt is a full lock installed with `pip install --no-deps` (see its header).

--no-deps means pip no longer checks that the lock is complete: a package that a new pin needs but the
lock misses would install silently and fail later as an ImportError on somebody's fresh clone. These
tests do that check against the environment the tests run in.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Left out of the lock on purpose (requirements.txt says why). Nothing else may be missing.
DELIBERATELY_ABSENT = {"triton"}
# What `python -m venv` puts in every environment.
VENV_BASE = {"pip", "setuptools"}


@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    requires: tuple[str, ...]


def parse_lock(text: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"not an exact pin: {raw!r}")
        name = canonicalize_name(req.name)
        if name in pins:
            raise ValueError(f"pinned twice: {req.name}")
        pins[name] = specs[0].version
    return pins


def lock_problems(pins: dict[str, str], installed: list[Installed]) -> list[str]:
    """Every way the environment and the lock disagree, or the lock misses a dependency."""
    problems: list[str] = []
    have = {canonicalize_name(d.name): d for d in installed}
    for name, version in sorted(pins.items()):
        if name not in have:
            problems.append(f"{name}=={version} is pinned but not installed")
        elif have[name].version != version:
            problems.append(f"{name} is pinned at {version} but {have[name].version} is installed")
    for name in sorted(set(have) - set(pins) - VENV_BASE):
        problems.append(f"{name}=={have[name].version} is installed but not pinned")
    for name in sorted(set(pins) & set(have)):
        for text in have[name].requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in DELIBERATELY_ABSENT:
                continue
            if dep not in pins:
                problems.append(f"{name} needs {req}, which the lock misses")
            elif not req.specifier.contains(pins[dep], prereleases=True):
                problems.append(f"{name} needs {req}, the lock has {dep}=={pins[dep]}")
    return problems


def installed_now() -> list[Installed]:
    return [Installed(d.metadata["Name"], d.version, tuple(d.requires or ())) for d in distributions()]


def test_the_lock_is_complete_and_is_what_is_installed() -> None:
    pins = parse_lock((ROOT / "requirements.txt").read_text())
    assert lock_problems(pins, installed_now()) == []
    assert not DELIBERATELY_ABSENT & set(pins)


def test_the_check_catches_a_missing_dependency_and_a_wrong_version() -> None:
    pins = parse_lock((ROOT / "requirements.txt").read_text())
    env = installed_now()
    without_sympy = {k: v for k, v in pins.items() if k != "sympy"}
    problems = lock_problems(without_sympy, env)
    assert f"sympy=={pins['sympy']} is installed but not pinned" in problems
    assert any(p.startswith("torch needs sympy") and "lock misses" in p for p in problems)

    too_old = dict(pins, sympy="1.0")
    assert any(p.startswith("torch needs sympy") for p in lock_problems(too_old, env))
    assert f"sympy is pinned at 1.0 but {pins['sympy']} is installed" in lock_problems(too_old, env)


def test_the_parser_refuses_loose_pins() -> None:
    assert parse_lock("numpy==2.2.6  # why\n\n# a comment\n") == {"numpy": "2.2.6"}
    for loose in ("numpy>=2", "numpy", "numpy==2.2.6,<3", "numpy==2.2.6\nNumPy==2.2.6"):
        with pytest.raises(ValueError):
            parse_lock(loose)
