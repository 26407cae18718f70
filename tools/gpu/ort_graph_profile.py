"""Where an exported packed graph spends its GPU time under ONNX Runtime's CUDA EP.

    python3 tools/gpu/ort_graph_profile.py MODEL_DIR... [--mix chunk500|broad] [--packs 8]
                                            [--opt-level all] [--out FILE.json]

For each exported model folder (model.onnx from `python -m virnuc_export`), on the same synthetic
16384-token packs (the lengths of tools/gpu/varlen_attention's chunk500/broad mixes, random residue
ids, <cls>/<eos> around each sequence):
  - tokens/s of the whole graph, inputs already on the GPU, timed with CUDA events over back-to-back
    runs (no host synchronisation between them);
  - CUDA kernel time by kernel, from torch.profiler (CUPTI sees every kernel in the process, ORT's
    included), grouped into families (matrix products, attention, rotary, layer norm, GELU, copies...).
Only the CUDA EP's kernels are counted: a graph node that ORT placed on the CPU shows up as a gap,
i.e. as GPU time below the wall time; the script prints both.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "varlen_attention"))
import ort_gpu
from varlen_gpu import lengths_broad, lengths_chunk500

FAMILIES = [
    ("matrix products", r"gemm|cutlass.*(gemm|tensorop)|sm90_xmma|nvjet|cublas|ampere_.*gemm|sm80_xmma"),
    ("attention", r"fmha|flash|attention|attn|softmax"),
    ("rotary", r"rotary"),
    ("layer norm", r"layernorm|layer_norm|skiplayernorm|LayerNorm"),
    ("GELU", r"gelu|Gelu"),
    ("copies / transposes", r"copy|transpose|Transpose|concat|Concat|split|Split|memcpy|Memcpy|slice|Slice"),
    ("reductions / pooling", r"reduce|Reduce"),
]


def family(kernel: str) -> str:
    for name, pat in FAMILIES:
        if re.search(pat, kernel, re.IGNORECASE):
            return name
    return "other elementwise"


def parse_sdpa(spec: str) -> int | None:
    """`default` (ORT's choice) or backend names joined by `+`, e.g. `flash`, `efficient+math`."""
    if spec == "default":
        return None
    return sum(ort_gpu.SDPA[name] for name in spec.split("+"))


def make_packs(mix: str, n_packs: int, budget: int, seed: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    fn = {"chunk500": lengths_chunk500, "broad": lengths_broad}[mix]
    packs = []
    for _ in range(n_packs):
        lengths = fn(rng, budget)
        ids, pos = [], []
        for n in lengths:
            residues = rng.integers(4, 24, size=n - 2)
            ids.append(np.concatenate([[0], residues, [2]]))
            pos.append(np.arange(n))
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        packs.append(
            {
                "input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)).cuda(),
                "position_ids": torch.from_numpy(np.concatenate(pos).astype(np.int64)).cuda(),
                "cu_seqlens": torch.from_numpy(cu).cuda(),
            }
        )
    return packs


def profile_model(ort, model_dir: Path, packs, opt_level: str, sdpa: str) -> dict:  # noqa: ANN001
    meta = json.loads((model_dir / "model.json").read_text())
    hidden = int(meta["model"]["hidden_size"])
    sess = ort_gpu.session(ort, str(model_dir / "model.onnx"), opt_level, parse_sdpa(sdpa))
    ro = ort_gpu.run_options(ort)
    bindings = []
    for p in packs:
        out = torch.empty(p["cu_seqlens"].numel() - 1, hidden, dtype=torch.float32, device="cuda")
        bindings.append((ort_gpu.bind(ort, sess, p, {"mean": out}), out))
    tokens = sum(int(p["input_ids"].numel()) for p in packs)

    def one_pass() -> None:
        for b, _ in bindings:
            sess.run_with_iobinding(b, ro)

    one_pass()
    one_pass()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_pass()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    wall = float(np.median(times))
    finite = all(bool(torch.isfinite(o).all()) for _, o in bindings)

    times = ort_gpu.cuda_kernel_times(one_pass)
    per_kernel = {name: us for name, (us, _) in times.items()}
    counts = {name: calls for name, (_, calls) in times.items()}
    gpu_us = sum(per_kernel.values())
    fam: dict[str, float] = defaultdict(float)
    for k, v in per_kernel.items():
        fam[family(k)] += v
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return {
        "model": str(model_dir),
        "opt_level": opt_level,
        "sdpa_kernel": sdpa,
        "tokens": tokens,
        "packs": len(packs),
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "gpu_kernel_s": gpu_us / 1e6,
        "gpu_busy": gpu_us / 1e6 / wall,
        "outputs_finite": finite,
        "families": {k: v / gpu_us for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": k[:160], "share": v / gpu_us, "calls": counts[k], "us_per_pass": v} for k, v in top
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--mix", choices=("chunk500", "broad"), default="chunk500")
    ap.add_argument("--packs", type=int, default=8)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--opt-level", default="all", choices=("none", "basic", "extended", "all"))
    ap.add_argument(
        "--sdpa",
        default="default",
        help="comma-separated attention-kernel settings to run each model under (default,flash,...)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ort = ort_gpu.load()
    print(f"onnxruntime {ort.__version__} ({ort.__file__}), {torch.cuda.get_device_name()}", flush=True)
    packs = make_packs(args.mix, args.packs, args.budget, seed=0)
    rows = []
    for m in args.models:
        for sdpa in args.sdpa.split(","):
            try:
                r = profile_model(ort, m, packs, args.opt_level, sdpa)
            except Exception as e:
                r = {"model": str(m), "sdpa_kernel": sdpa, "error": f"{type(e).__name__}: {e}"[:2000]}
            r["mix"] = args.mix
            rows.append(r)
            print(json.dumps(r, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
