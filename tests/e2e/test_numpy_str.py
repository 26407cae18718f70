"""virnuc-trt's float32 formatting (VirNucPro's score columns) against numpy's `str(np.float32(x))`."""

from __future__ import annotations

import numpy as np
from e2e_helpers import ROOT, run


def test_float32_str_equals_numpy_on_many_values():
    r = run(["cargo", "build", "--quiet", "-p", "virnuc-predict", "--example", "numpy_str"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    exe = ROOT / "target" / "debug" / "examples" / "numpy_str"
    rng = np.random.default_rng(0)
    groups = [
        rng.integers(0, 2**32, size=150_000, dtype=np.uint64).astype(np.uint32),  # any bit pattern
        np.arange(0x3F7F0000, 0x3F800001, dtype=np.uint32),  # every float32 in [0.996, 1.0]
        np.float32(1e-4).view(np.uint32) + np.arange(-2000, 2000, dtype=np.int64).astype(np.uint32),
        np.float32(1e16).view(np.uint32) + np.arange(-2000, 2000, dtype=np.int64).astype(np.uint32),
        (np.arange(1, 255, dtype=np.uint32) << 23),  # powers of two (asymmetric rounding bounds)
        np.arange(0, 5000, dtype=np.uint32),  # subnormals
    ]
    # Softmax outputs as the classifier makes them, saturated ones included.
    logits = (rng.standard_normal((50_000, 2)) * rng.choice([0.1, 3.0, 30.0], size=(50_000, 1))).astype(
        np.float32
    )
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    groups.append((e / e.sum(axis=1, keepdims=True)).astype(np.float32).reshape(-1).view(np.uint32))
    bits = np.concatenate(groups).astype(np.uint32)
    values = bits.view(np.float32)
    stdin = "".join(f"{b:08x}\n" for b in bits.tolist())
    r = run([exe], input=stdin)
    assert r.returncode == 0, r.stderr
    got = r.stdout.split("\n")[:-1]
    assert len(got) == len(values)
    want = [str(v) for v in values]
    bad = [(hex(b), w, g) for b, w, g in zip(bits.tolist(), want, got, strict=True) if w != g]
    assert not bad, f"{len(bad)} of {len(values)} differ, e.g. {bad[:10]}"
