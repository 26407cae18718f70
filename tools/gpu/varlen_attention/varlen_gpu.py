"""VarlenAttention on the GPU machine: correctness against float64, and speed against torch.

Loads the fatbin that plugins/varlen_attention/build.sh built (carried to the device) with CuPy
and launches the kernels on torch tensors (zero-copy through DLPack), so what runs is exactly the
artifact the Rust runtime loads.

    python3 varlen_gpu.py check  [--quick] [--out FILE]   # float64 reference, every head dim, rotary,
                                                          # no positions and ALiBi (contract v2)
    python3 varlen_gpu.py bench  [--out FILE]             # attention-only timing vs torch flash varlen
    python3 varlen_gpu.py bench-d128 [--out FILE]         # the same at head_dim 128 (ESM-2 15B)
    python3 varlen_gpu.py control                         # shows the checks can fail (ALiBi too)

Runs only where torch sees a GPU and CuPy is installed (the device image has both).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cupy  # type: ignore[import-not-found]
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
FATBIN = Path(os.environ.get("VARLEN_FATBIN", ROOT / "build/varlen_attention/varlen_attention.fatbin"))
HEAD_DIMS = (16, 24, 32, 64, 128)
# The ALiBi kernels' last parameter, virnuc::varlen::AlibiSlopes (varlen_attention_launch.h): 128
# float32 slopes by value (CuPy passes a structured NumPy scalar as a struct).
MAX_ALIBI_HEADS = 128
ALIBI_T = np.dtype({"names": ["slope"], "formats": [(np.float32, (MAX_ALIBI_HEADS,))]})
# DNABERT-S's ALiBi slopes: 2^-1 ... 2^-8, then 2^-0.5 ... 2^-3.5 (float32).
DNABERT_SLOPES = [2.0**-k for k in range(1, 9)] + [2.0**-x for x in (0.5, 1.5, 2.5, 3.5)]


def alibi_slopes(heads: int) -> list[float]:
    """DNABERT-S's slopes cycled over `heads` (rounded to float32, as the kernel gets them)."""
    return [float(np.float32(DNABERT_SLOPES[h % 12])) for h in range(heads)]


def alibi_arg(slopes: list[float] | None) -> np.ndarray:
    buf = np.zeros(MAX_ALIBI_HEADS, dtype=np.float32)
    if slopes:
        buf[: len(slopes)] = slopes
    return buf.view(ALIBI_T)


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-3}
# Launch geometry (plugins/varlen_attention/varlen_attention_launch.h). To time an older fatbin
# against the current one, VARLEN_GEOMETRY names its geometry: v1, the first version's (64 rows,
# 128 threads for 16-bit); v3, the 8-warp fp16 kernel's before fp16 ran 32 rows a warp at head_dim
# 64/128 (256 threads at 64, 128 at 128).
GEOMETRY = os.environ.get("VARLEN_GEOMETRY", "")


def geometry(dtype: str, head_dim: int) -> tuple[int, int]:
    """(threads, query rows) per block.

    fp16 at head_dim 64 and 128 runs 32 rows a warp: 4 warps (128 threads) over 128 rows at 64,
    2 warps (64 threads) over 64 rows at 128. Other 16-bit kernels: 16 rows a warp, 8 warps
    (256 threads, 128 rows), 4 at head_dim 128. fp32: 128 threads, 32 rows."""
    if dtype == "f32":
        return 128, 32
    if GEOMETRY == "v1":
        return 128, 64
    if dtype == "f16" and GEOMETRY != "v3" and head_dim == 64:
        return 128, 128
    if dtype == "f16" and GEOMETRY != "v3" and head_dim == 128:
        return 64, 64
    return (128, 64) if head_dim == 128 else (256, 128)


class Kernels:
    """The fatbin's entry points, looked up by name as the Rust loader does."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SystemExit(f"{path} missing: run plugins/varlen_attention/build.sh first")
        self.module = cupy.RawModule(path=str(path))
        self.cache: dict[str, Any] = {}

    def get(self, dtype: str, head_dim: int, alibi: bool = False) -> Any:
        name = f"virnuc_varlen_attention_{'alibi_' if alibi else ''}{dtype}_d{head_dim}"
        if name not in self.cache:
            self.cache[name] = self.module.get_function(name)
        return self.cache[name]

    def launch(
        self,
        dtype: str,
        qkv: torch.Tensor,
        cu: torch.Tensor,
        pos: torch.Tensor,
        out: torch.Tensor,
        heads: int,
        scale: float,
        rotary: bool,
        base: float = 10000.0,
        alibi: list[float] | None = None,
    ) -> None:
        """`alibi`: ALiBi mode with these slopes (one per head; rotary must then be off)."""
        total = qkv.shape[0]
        head_dim = qkv.shape[1] // (3 * heads)
        batch = cu.shape[0] - 1
        if total == 0 or batch == 0:
            return
        threads, block_m = geometry(dtype, head_dim)
        grid = (total // block_m + batch, heads, 1)
        stream = cupy.cuda.Stream.from_external(torch.cuda.current_stream())
        with stream:
            self.get(dtype, head_dim, bool(alibi))(
                grid,
                (threads, 1, 1),
                (
                    cupy.uint64(qkv.data_ptr()),
                    cupy.uint64(cu.data_ptr()),
                    cupy.uint64(pos.data_ptr()),
                    cupy.uint64(out.data_ptr()),
                    np.int32(total),
                    np.int32(batch),
                    np.int32(heads),
                    np.float32(scale),
                    np.int32(1 if rotary else 0),
                    np.float32(base),
                    alibi_arg(alibi),
                ),
            )


def make_pack(
    lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> dict:
    total = sum(lengths)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device="cuda")
    pos = (
        torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])
        if total
        else torch.zeros(0, dtype=torch.int64)
    )
    qkv = torch.randn(total, 3 * heads * head_dim, generator=gen, device="cuda", dtype=torch.float32).to(
        dtype
    )
    return {"qkv": qkv, "cu": cu, "pos": pos.cuda(), "lengths": lengths}


def inv_freq_f32(head_dim: int, base: float) -> torch.Tensor:
    """1 / base ** (2i / D) in float32, as HF's EsmRotaryEmbedding computes it (the contract)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # The float32 power correctly rounded (through float64), as glibc's powf and the kernel give it:
    # numpy's own float32 power may differ by an ulp depending on its version and SIMD path.
    power = (float(np.float32(base)) ** exponent.astype(np.float64)).astype(np.float32)
    return torch.from_numpy((np.float32(1.0) / power).astype(np.float32))


def reference(
    pack: dict,
    heads: int,
    head_dim: int,
    scale: float,
    rotary: bool,
    base: float = 10000.0,
    alibi: list[float] | None = None,
    alibi_query_from_pack_start: bool = False,
) -> torch.Tensor:
    """The contract in float64 (angles in float32 as specified), one sequence at a time.

    `alibi`: scores - slope_h * |i - j|, i and j offsets in the sequence; for the negative control,
    `alibi_query_from_pack_start` counts the query's offset from the pack start instead."""
    qkv = pack["qkv"].double()
    total = qkv.shape[0]
    x = qkv.view(total, 3, heads, head_dim)
    q, k, v = x[:, 0], x[:, 1], x[:, 2]
    if rotary:
        inv = inv_freq_f32(head_dim, base).cuda()
        angle = (pack["pos"].float()[:, None] * inv[None, :]).double()  # float32 product
        cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
        half = head_dim // 2

        def rot(t: torch.Tensor) -> torch.Tensor:
            t1, t2 = t[..., :half], t[..., half:]
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

        q, k = rot(q), rot(k)
    out = torch.empty(total, heads, head_dim, dtype=torch.float64, device="cuda")
    cu = pack["cu"].tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if s == e:
            continue
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        scores = scale * qs @ ks.transpose(1, 2)
        if alibi:
            offsets = torch.arange(e - s, dtype=torch.float64, device="cuda")
            rows = offsets + (s if alibi_query_from_pack_start else 0)
            dist = (rows[:, None] - offsets[None, :]).abs()
            slopes = torch.tensor(alibi, dtype=torch.float64, device="cuda")
            scores = scores - slopes[:, None, None] * dist[None]
        p = torch.softmax(scores, dim=-1)
        out[s:e] = (p @ vs).transpose(0, 1)
    return out.reshape(total, heads * head_dim)


@dataclass
class Case:
    name: str
    lengths: list[int]
    heads: int
    rotary: bool = True
    scale: float | None = None
    alibi: bool = False  # ALiBi kernels, DNABERT-S's slopes cycled over the heads, rotary off


def cases(head_dim: int, rng: np.random.Generator, quick: bool) -> list[Case]:
    heads = {16: 20, 24: 20, 32: 20, 64: 4, 128: 3}[head_dim]
    out = [
        Case("single-1", [1], heads),
        Case("single-1024", [1024], heads),
        Case("tile-edges", [63, 64, 65, 31, 32, 33, 127, 128, 129, 1, 2], heads),
        Case("with-empty", [0, 5, 0, 70, 0], heads),
        Case("pack256-short", rng.integers(1, 40, 256).tolist(), heads),
        Case("pack37-broad", rng.integers(1, 1025, 37).tolist(), heads),
        Case("no-rotary", rng.integers(1, 300, 9).tolist(), heads, rotary=False),
        Case("scale-0.3", rng.integers(1, 300, 9).tolist(), heads, scale=0.3),
        # ALiBi (contract version 2): 12 heads as DNABERT-S, one sequence far past its 512 tokens.
        Case("alibi-single-1", [1], 12, rotary=False, alibi=True),
        Case("alibi-tile-edges", [63, 64, 65, 31, 32, 33, 127, 128, 129, 1, 2], 12, False, alibi=True),
        Case("alibi-pack37", rng.integers(1, 1025, 37).tolist(), 12, False, alibi=True),
        Case("alibi-2600", [5, 2600, 0, 70], 12, False, alibi=True),
        Case("alibi-scale-neg", rng.integers(1, 300, 9).tolist(), 12, False, scale=-0.2, alibi=True),
    ]
    if quick:
        return [
            out[0],
            out[2],
            out[3],
            Case("small-pack", [3, 100, 17], heads),
            Case("alibi-small-pack", [3, 100, 0, 17], 12, False, alibi=True),
        ]
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref))


def run_check(quick: bool, out_path: Path | None) -> bool:
    kernels = Kernels(FATBIN)
    rng = np.random.default_rng(int(time.time()))
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(rng.integers(1 << 31)))
    rows: list[dict] = []
    ok = True
    dtypes = ["f16", "bf16", "f32"]
    for head_dim in HEAD_DIMS:
        for dtype in dtypes:
            for case in cases(head_dim, rng, quick):
                pack = make_pack(case.lengths, case.heads, head_dim, DTYPES[dtype], gen)
                scale = case.scale if case.scale is not None else head_dim**-0.5
                total = sum(case.lengths)
                out = torch.full(
                    (total, case.heads * head_dim), float("nan"), dtype=DTYPES[dtype], device="cuda"
                )
                slopes = alibi_slopes(case.heads) if case.alibi else None
                kernels.launch(
                    dtype,
                    pack["qkv"],
                    pack["cu"],
                    pack["pos"],
                    out,
                    case.heads,
                    scale,
                    case.rotary,
                    alibi=slopes,
                )
                torch.cuda.synchronize()
                ref = reference(pack, case.heads, head_dim, scale, case.rotary, alibi=slopes)
                finite = bool(torch.isfinite(out).all())
                err = rel_err(out, ref) if total else 0.0
                passed = finite and err <= TOLERANCE[dtype]
                ok &= passed
                rows.append(
                    {
                        "dtype": dtype,
                        "head_dim": head_dim,
                        "case": case.name,
                        "mode": "alibi" if case.alibi else "rotary" if case.rotary else "none",
                        "sequences": len(case.lengths),
                        "tokens": total,
                        "max_len": max(case.lengths),
                        "rel_err": err,
                        "all_written": finite,
                        "pass": passed,
                    }
                )
                flag = "ok " if passed else "FAIL"
                print(
                    f"{flag} {dtype:4} D={head_dim:3} {case.name:14} B={len(case.lengths):3} "
                    f"T={total:6} rel={err:.2e}"
                )
    worst: dict[tuple[str, int, str], float] = {}
    for r in rows:
        key = (r["dtype"], r["head_dim"], "alibi" if r["mode"] == "alibi" else "rotary/none")
        worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    print("\nworst relative error per dtype / head dim / mode (tolerance f32 1e-5, f16/bf16 2e-3):")
    for (dtype, d, mode), e in sorted(worst.items()):
        print(f"  {dtype:4} D={d:3} {mode:11}: {e:.2e}")
    print(f"{len(rows)} cases, {'ALL PASS' if ok else 'FAILURES'}")
    if out_path:
        out_path.write_text(json.dumps({"cases": rows, "pass": ok}, indent=1))
    return ok


def run_control() -> bool:
    """The checks can fail: the kernel against a reference that differs from the contract."""
    kernels = Kernels(FATBIN)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    head_dim, heads = 64, 4
    pack = make_pack([50, 80, 33], heads, head_dim, torch.float16, gen)
    out = torch.full((163, heads * head_dim), float("nan"), dtype=torch.float16, device="cuda")
    kernels.launch("f16", pack["qkv"], pack["cu"], pack["pos"], out, heads, 0.125, True)
    torch.cuda.synchronize()
    good = rel_err(out, reference(pack, heads, head_dim, 0.125, True))
    no_rot = rel_err(out, reference(pack, heads, head_dim, 0.125, False))
    merged = dict(pack, cu=torch.tensor([0, 130, 163], dtype=torch.int32, device="cuda"))
    wrong_bounds = rel_err(out, reference(merged, heads, head_dim, 0.125, True))
    unwritten = out.clone()
    unwritten[7, 3] = float("nan")
    print(
        f"control: contract {good:.2e} (must pass), reference without rotary {no_rot:.2e}, "
        f"merged sequences {wrong_bounds:.2e} (both must exceed 2e-3), "
        f"one unwritten element detected: {not bool(torch.isfinite(unwritten).all())}"
    )
    ok = good <= 2e-3 and no_rot > 2e-3 and wrong_bounds > 2e-3 and not bool(torch.isfinite(unwritten).all())
    # ALiBi (DNABERT-S's 12 heads): the kernel's output against references without ALiBi, with the
    # slopes in reversed head order, and with the query offset counted from the pack start.
    heads = 12
    slopes = alibi_slopes(heads)
    pack = make_pack([50, 80, 33], heads, head_dim, torch.float16, gen)
    out = torch.full((163, heads * head_dim), float("nan"), dtype=torch.float16, device="cuda")
    kernels.launch("f16", pack["qkv"], pack["cu"], pack["pos"], out, heads, 0.125, False, alibi=slopes)
    torch.cuda.synchronize()
    a_good = rel_err(out, reference(pack, heads, head_dim, 0.125, False, alibi=slopes))
    a_none = rel_err(out, reference(pack, heads, head_dim, 0.125, False))
    a_rev = rel_err(out, reference(pack, heads, head_dim, 0.125, False, alibi=slopes[::-1]))
    a_glob = rel_err(
        out, reference(pack, heads, head_dim, 0.125, False, alibi=slopes, alibi_query_from_pack_start=True)
    )
    print(
        f"control ALiBi: contract {a_good:.2e} (must pass), reference without ALiBi {a_none:.2e}, "
        f"slopes reversed {a_rev:.2e}, query offset from the pack start {a_glob:.2e} (all must exceed 2e-3)"
    )
    ok &= a_good <= 2e-3 and a_none > 2e-3 and a_rev > 2e-3 and a_glob > 2e-3
    print("control:", "checks can fail (OK)" if ok else "CONTROL BROKEN")
    return ok


# --------------------------------------------------------------------------------------------
# Speed


def lengths_chunk500(rng: np.random.Generator, budget: int) -> list[int]:
    out: list[int] = []
    while True:
        n = 168 if rng.random() < 0.75 else int(rng.integers(20, 169))
        if sum(out) + n > budget:
            return out
        out.append(n)


def lengths_broad(rng: np.random.Generator, budget: int) -> list[int]:
    out: list[int] = []
    while True:
        n = int(np.clip(rng.lognormal(math.log(300.0), 0.7), 50, 1024))
        if sum(out) + n > budget:
            return out
        out.append(n)


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF EsmRotaryEmbedding's rotate_half form, as a torch packed model applies it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def time_ms(fn: Any, iters: int = 50, groups: int = 5) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    meds = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        meds.append(start.elapsed_time(end) / iters)
    return float(np.median(meds))


# (label, heads, head_dim, dtype, mixes) of each benchmark row set.
BENCH_MAIN = [(f"{m} H={h} D=64", h, 64, "f16", ("chunk500", "broad")) for m, h in (("650M", 20), ("3B", 40))]
# ESM-2 15B's attention shape (head_dim 128), fp16, both mixes.
BENCH_D128 = [("15B H=40 D=128", 40, 128, "f16", ("chunk500", "broad"))]
# Every ESM-2 size's attention shape, fp16 and bf16, on the chunk500 mix.
BENCH_SIZES = [
    (f"{m} H={h} D={d}", h, d, dt, ("chunk500",))
    for dt in ("f16", "bf16")
    for m, h, d in (
        ("8M", 20, 16),
        ("35M", 20, 24),
        ("150M", 20, 32),
        ("650M", 20, 64),
        ("3B", 40, 64),
        ("15B", 40, 128),
    )
]


def run_bench(out_path: Path | None, configs: list | None = None) -> None:
    kernels = Kernels(FATBIN)
    rng = np.random.default_rng(0)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    budget = 16384
    rows = []
    flash = torch.ops.aten._flash_attention_forward
    mixes = {"chunk500": lengths_chunk500, "broad": lengths_broad}
    for model, heads, head_dim, tag, mix_names in configs or BENCH_MAIN:
        for mix in mix_names:
            fn = mixes[mix]
            lengths = fn(rng, budget)
            dtype = DTYPES[tag]
            pack = make_pack(lengths, heads, head_dim, dtype, gen)
            total = sum(lengths)
            qkv, cu, pos = pack["qkv"], pack["cu"], pack["pos"]
            max_len = max(lengths)
            out = torch.empty(total, heads * head_dim, dtype=dtype, device="cuda")
            scale = head_dim**-0.5
            inv = inv_freq_f32(head_dim, 10000.0).cuda()
            ang = pos.float()[:, None] * inv[None, :]
            cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)[:, None, :]
            sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)[:, None, :]
            x = qkv.view(total, 3, heads, head_dim)

            def ours_rot() -> None:
                kernels.launch(tag, qkv, cu, pos, out, heads, scale, True)  # noqa: B023

            def ours_norot() -> None:
                kernels.launch(tag, qkv, cu, pos, out, heads, scale, False)  # noqa: B023

            slopes = alibi_slopes(heads)

            def ours_alibi() -> None:
                kernels.launch(tag, qkv, cu, pos, out, heads, scale, False, alibi=slopes)  # noqa: B023

            def torch_flash() -> None:
                flash(x[:, 0], x[:, 1], x[:, 2], cu, cu, max_len, max_len, 0.0, False, False, scale=scale)  # noqa: B023

            def torch_rot_flash() -> None:
                q = rotary_torch(x[:, 0], cos, sin)  # noqa: B023
                k = rotary_torch(x[:, 1], cos, sin)  # noqa: B023
                flash(q, k, x[:, 2], cu, cu, max_len, max_len, 0.0, False, False, scale=scale)  # noqa: B023

            # Same numbers from both (equal results before racing).
            ours_rot()
            got = out.clone()
            ref = flash(
                rotary_torch(x[:, 0], cos, sin),
                rotary_torch(x[:, 1], cos, sin),
                x[:, 2],
                cu,
                cu,
                max_len,
                max_len,
                0.0,
                False,
                False,
                scale=scale,
            )[0].reshape(total, -1)
            agree = rel_err(got, ref.double())
            t = {
                name: time_ms(f)
                for name, f in (
                    ("ours_rotary", ours_rot),
                    ("ours_no_rotary", ours_norot),
                    ("ours_alibi", ours_alibi),
                    ("torch_flash", torch_flash),
                    ("torch_rotary_flash", torch_rot_flash),
                )
            }
            flops = 4.0 * sum(n * n for n in lengths) * head_dim * heads
            row = {
                "dtype": tag,
                "model": model,
                "mix": mix,
                "tokens": total,
                "sequences": len(lengths),
                "max_len": max_len,
                "agree_vs_torch": agree,
                **{f"{k}_us": v * 1e3 for k, v in t.items()},
                "ours_rotary_tflops": flops / (t["ours_rotary"] * 1e-3) / 1e12,
            }
            rows.append(row)
            print(json.dumps(row))
    print(
        "\n| model | mix | seqs | ours (rotary fused) µs | ours (no rotary) µs | torch flash µs "
        "| torch rotary+flash µs | speed-up vs rotary+flash |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} {r['dtype']} | {r['mix']} | {r['sequences']} | {r['ours_rotary_us']:.1f} "
            f"| {r['ours_no_rotary_us']:.1f} | "
            f"{r['torch_flash_us']:.1f} | {r['torch_rotary_flash_us']:.1f} | "
            f"{r['torch_rotary_flash_us'] / r['ours_rotary_us']:.2f}x |"
        )
    if out_path:
        out_path.write_text(json.dumps(rows, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["check", "bench", "bench-sizes", "bench-d128", "control"])
    ap.add_argument("--quick", action="store_true", help="a few small cases (for compute-sanitizer)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cupy {cupy.__version__}",
        flush=True,
    )
    if args.mode == "check":
        return 0 if run_check(args.quick, args.out) else 1
    if args.mode == "control":
        return 0 if run_control() else 1
    configs = {"bench-sizes": BENCH_SIZES, "bench-d128": BENCH_D128}.get(args.mode, BENCH_MAIN)
    run_bench(args.out, configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
