#!/usr/bin/env python3
"""virnuc-trt against its peers, end to end (protein FASTA in, mean-embedding HDF5 out), in one run.

Tools (`--peers`; `NAME:PREC` pins a precision):
  virnuc-trt    the release binary, `virnuc-trt embed --mode protein`, one row per budget in
                --virnuc-budgets (the best marked); model exported here with random weights
                (`python -m virnuc_export --random NAME --seed N --attention ATTN --precision P`), cached
                in --work, export time reported apart. fp16 and fp32 (from --precisions).
  hf-eager      HF transformers EsmModel, eager attention, fp32, padded length-sorted batches of
                --hf-eager-budget (4096) tokens: fair-esm batching, VirNucPro v1.0.
  hf-sdpa       HF EsmModel, SDPA attention, padded, --hf-sdpa-budget (16384) tokens; fp16 on GPU,
                fp32 on CPU.
  torch-packed  our packed PyTorch ESM-2 forward (tools/bench/packed_esm.py): FFD packs of
                --packed-budget (16384) tokens, aten flash varlen attention, per-sequence rotary; fp16
                (VirNucPro v2.0 / virnucpro-broad / FAESM approach). Proven equal to HF by
                tools/bench/tests/test_peers.py.
Every tool gets identical weights (the exporter's seeded RandomWeights) and the same sequences; each
row reports tokens/s (real tokens), seq/s, GPU busy % (NVML), peak GPU memory, padding share, % of the
arithmetic limit (24*H^2*layers FLOPs/token over an fp16 matmul ceiling measured in the same run) and the
cosine (min/mean per sequence) of its mean embeddings against the reference run: virnuc-trt fp32, else
virnuc-trt fp16, else hf-eager fp32 (also found in --work from an earlier piece of the same run).

Workloads (`--workloads`, each --max-tokens tokens, default 200000 on GPU, 20000 on CPU):
  chunk500  500 bp chunks of klebsiella_HS11286.fna.gz + lambda_virus.fa (tests/fixtures, so a fresh
            clone has them), six frames, stop-free frames (`virnuc-trt translate`), a seeded sample;
            needs the binary or a staged pool.
  broad     synthetic proteins, log-normal lengths 50-1024 tokens, seeded.

On the GPU machine (it has no ../shared; stage what it needs into the ignored .device-stage/bench):
  here:   source tools/setup.sh && cargo build --release -p virnuc-trt && python3 tools/bench/run.py prepare
          (copies the stripped binary, the genomes and the translated chunk500 pool, ~13 MiB), then stage
          ONNX Runtime GPU with ../shared/device/stage-ort-gpu (5 runs on the same warm machine).
  device: each call carries [".device-stage/bench"] and starts with
          source /opt/onnxruntime-gpu/env.sh; export PYTHONUNBUFFERED=1;
          1. tools/bench/run.py bench --models esm2_t33_650M --passes 2 --tag e2e-650M
          2. tools/bench/run.py bench --models esm2_t36_3B --precisions fp16 --passes 2 --tag e2e-3B-fp16
          3. tools/bench/run.py bench --models esm2_t36_3B --precisions fp32 --tag e2e-3B-fp32
          (each as `python3 tools/bench/run.py ... 2>&1 | tee $OUT/<tag>.log`; results in
          $OUT/<tag>.md and .json; exports are cached in --work while the machine stays warm). Merge here:
          python3 tools/bench/run.py table /work/.device/*/e2e-*.json --out out/bench --tag e2e
  --passes 2 times the PyTorch peers warm (HF SDPA pays a one-time cost per padded shape); virnuc-trt
  always runs cold, as a user runs it. Quick runs: --max-tokens 50000, --workloads broad.
CPU mode (`--cpu`, default models esm2_t6_8M,esm2_t12_35M, peers virnuc-trt,hf-eager,hf-sdpa,
ep cpu, attention virnuc):  source tools/setup.sh && python tools/bench/run.py bench --cpu
Rounds (`--rounds`, default 3 on CPU, 1 on GPU): every tool runs once a round, in order on even rounds
and in reverse order on odd ones, so that drift (heat, caches, other load) falls on all tools alike; a
row reports the median round (tokens/s, run s) and the fastest (best tokens/s, min s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
for _p in (BENCH, REPO / "export"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("VIRNUC_ROOT", str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import report  # noqa: E402
import workloads as wl  # noqa: E402

DEFAULT_STAGE = REPO / ".device-stage" / "bench"


def default_binary(staged: Path, built: Path) -> Path:
    """The newer of the staged copy (`prepare`, for the GPU machine) and the local release build.

    Preferring the staged copy whenever it exists once timed a stale binary here after a rebuild.
    """
    present = [b for b in (built, staged) if b.exists()]
    return max(present, key=lambda b: b.stat().st_mtime) if present else built


def binary_identity(binary: Path) -> str:
    """Path, size and hash prefix: which build a table's virnuc-trt rows came from."""
    if not binary.exists():
        return f"{binary} (missing)"
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:12]
    return f"{binary} ({binary.stat().st_size} bytes, sha256 {digest}…)"


# The genomes ship with the repository: a fresh clone runs every workload.
DEFAULT_DATA = REPO / "tests" / "fixtures"
PEER_ORDER = ("virnuc-trt", "hf-eager", "hf-sdpa", "torch-packed")


@dataclass(frozen=True)
class RunSpec:
    tool: str
    precision: str
    attention: str = ""  # virnuc-trt export flavor


def parse_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="run the benchmark (GPU if present, or --cpu)")
    b.add_argument("--cpu", action="store_true", help="CPU mode (default when no CUDA device)")
    b.add_argument(
        "--models", help="comma list (GPU: esm2_t33_650M,esm2_t36_3B; CPU: esm2_t6_8M,esm2_t12_35M)"
    )
    b.add_argument("--precisions", help="comma list of fp16,fp32 (GPU: both; CPU: fp32)")
    b.add_argument(
        "--peers",
        help="comma list of virnuc-trt,hf-eager,hf-sdpa,torch-packed, each optionally NAME:PREC "
        "(GPU default: all four; CPU: virnuc-trt,hf-eager,hf-sdpa)",
    )
    b.add_argument("--workloads", default="chunk500,broad", help="comma list of chunk500,broad")
    b.add_argument("--max-tokens", type=int, help="tokens per workload (GPU 200000, CPU 20000)")
    b.add_argument("--seed", type=int, default=1, help="weights and workload seed (default 1)")
    b.add_argument(
        "--virnuc-trt",
        type=Path,
        help="binary (default: the newer of STAGE/bin/virnuc-trt and target/release/virnuc-trt)",
    )
    b.add_argument(
        "--virnuc-budgets",
        help="comma list of --toks-per-batch values (GPU 16384, CPU 2048: the binary's defaults)",
    )
    b.add_argument(
        "--virnuc-attention", help="export flavors, comma list of ort,virnuc,masked (GPU ort, CPU virnuc)"
    )
    b.add_argument("--virnuc-args", default="", help="extra arguments for `virnuc-trt embed` (one string)")
    b.add_argument("--hf-eager-budget", type=int, default=4096)
    b.add_argument("--hf-sdpa-budget", type=int, default=16384)
    b.add_argument("--packed-budget", type=int, default=16384)
    b.add_argument("--stage", type=Path, default=DEFAULT_STAGE, help="staged binary/data/pool (prepare)")
    b.add_argument("--data", type=Path, help="folder with the genomes (default tests/fixtures)")
    b.add_argument("--work", type=Path, default=Path("/tmp/virnuc-bench"), help="exports, workloads, outputs")
    b.add_argument("--results", type=Path, help="results folder (default $OUT, else out/bench)")
    b.add_argument("--tag", help="results file name stem (default bench-<mode>-<UTC time>)")
    b.add_argument(
        "--passes",
        type=int,
        default=1,
        help="PyTorch peers: run each workload this many times in the same process and time the last "
        "(steady state: per-shape one-time costs paid); virnuc-trt always runs cold, as a user runs it",
    )
    b.add_argument("--reexport", action="store_true", help="export again even when cached in --work")
    b.add_argument(
        "--rounds",
        type=int,
        help="alternating rounds over all tools (default 3 on CPU, 1 on GPU); rows give median and best",
    )

    s = sub.add_parser(
        "prepare", help="stage binary, genomes and the translated chunk500 pool for the device"
    )
    s.add_argument("--virnuc-trt", type=Path, default=REPO / "target" / "release" / "virnuc-trt")
    s.add_argument("--data", type=Path, default=DEFAULT_DATA)
    s.add_argument("--stage", type=Path, default=DEFAULT_STAGE)

    t = sub.add_parser("table", help="merge result JSON files (pieces of one run) into one table")
    t.add_argument("files", nargs="+", type=Path)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--tag", default="bench-merged")
    return p


def expand_runs(args: argparse.Namespace, cuda: bool) -> list[RunSpec]:
    precisions = parse_list(args.precisions or ("fp16,fp32" if cuda else "fp32"))
    peers = parse_list(
        args.peers or ("virnuc-trt,hf-eager,hf-sdpa,torch-packed" if cuda else "virnuc-trt,hf-eager,hf-sdpa")
    )
    flavors = parse_list(args.virnuc_attention or ("ort" if cuda else "virnuc"))
    natural = {
        "hf-eager": "fp32",
        "hf-sdpa": "fp16" if cuda else "fp32",
        "torch-packed": "fp16" if cuda else "fp32",
    }
    runs: list[RunSpec] = []
    for item in peers:
        name, _, pinned = item.partition(":")
        if name not in PEER_ORDER:
            raise SystemExit(f"unknown peer {name!r} (known: {', '.join(PEER_ORDER)})")
        if name == "virnuc-trt":
            for prec in [pinned] if pinned else precisions:
                runs += [RunSpec(name, prec, flavor) for flavor in flavors]
        else:
            prec = pinned or natural[name]
            if pinned or prec in precisions:
                runs.append(RunSpec(name, prec))
    return sorted(runs, key=lambda r: (PEER_ORDER.index(r.tool), r.precision != "fp32"))


def round_order(runs: list[RunSpec], index: int) -> list[RunSpec]:
    """The tools of round `index`: in order on even rounds, reversed on odd ones (A B C, C B A, …)."""
    return list(runs) if index % 2 == 0 else list(reversed(runs))


ROW_KEY = ("model", "workload", "tool", "precision", "budget", "attention")


def aggregate_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, workload, tool, precision, budget, attention) from its rounds, in first-seen
    order: the median round's figures (`seconds`, `tok_s`, `seq_s`, `limit_pct` from the median time),
    plus `seconds_min`, `tok_s_best` (the fastest round), `rounds` and every round's seconds. A key whose
    rounds all failed keeps its last error row; failed rounds next to good ones are counted."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in ROW_KEY), []).append(r)
    out: list[dict[str, Any]] = []
    for group in groups.values():
        ok = [r for r in group if not r.get("error")]
        if not ok:
            out.append({k: v for k, v in group[-1].items() if k != "round"})
            continue
        seconds = [r["seconds"] for r in ok]
        median = statistics.median(seconds)
        fastest = min(seconds)
        mid = sorted(ok, key=lambda r: r["seconds"])[(len(ok) - 1) // 2]
        row = {k: v for k, v in mid.items() if k != "round"}
        row["rounds"] = len(ok)
        row["round_seconds"] = seconds
        row["seconds"] = median
        row["seconds_min"] = fastest
        row["tok_s"] = row["tokens"] / median
        row["tok_s_best"] = row["tokens"] / fastest
        row["seq_s"] = row["sequences"] / median
        if mid.get("limit_pct") is not None:
            row["limit_pct"] = mid["limit_pct"] * mid["seconds"] / median
        if len(ok) < len(group):
            row["failed_rounds"] = len(group) - len(ok)
        out.append(row)
    return out


def software(cuda: bool, binary: Path | None) -> str:
    import torch
    import transformers

    parts = [
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    if cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    if binary is not None and binary.exists():
        v = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if v:
            parts.append(v)
    return ", ".join(parts)


def make_workloads(args: argparse.Namespace, binary: Path, tokens: int) -> dict[str, wl.Workload]:
    out: dict[str, wl.Workload] = {}
    for name in parse_list(args.workloads):
        path = args.work / "workloads" / f"{name}-{tokens}-s{args.seed}.fa"
        if name == "broad":
            out[name] = wl.broad(path, tokens, args.seed)
        elif name == "chunk500":
            pool = args.stage / "workloads" / wl.POOL_NAME
            if not pool.exists():
                pool = args.work / "workloads" / wl.POOL_NAME
                data = args.data or DEFAULT_DATA
                seconds = wl.translate_pool(binary, [data / g for g in wl.GENOMES], pool)
                print(f"translated the genomes in {seconds:.1f} s → {pool}", file=sys.stderr)
            out[name] = wl.chunk500(pool, path, tokens, args.seed)
        else:
            raise SystemExit(f"unknown workload {name!r} (known: {', '.join(wl.WORKLOADS)})")
    return out


def pick_ref(doc: dict[str, Any], work: Path, model: str, workload: str) -> tuple[str, Path] | None:
    """The cosine reference for (model, workload): this run's rows first, then outputs of earlier pieces."""
    rows = [r for r in doc["rows"] if (r["model"], r["workload"]) == (model, workload) and not r.get("error")]
    for tool, prec in (("virnuc-trt", "fp32"), ("virnuc-trt", "fp16"), ("hf-eager", "fp32")):
        for r in rows:
            if (r["tool"], r["precision"]) == (tool, prec):
                return f"{tool} {prec} (budget {r['budget']})", Path(r["output"])
        found = sorted((work / "out" / model / workload).glob(f"{tool}-{prec}-*.h5"))
        if found:
            return f"{tool} {prec} ({found[0].stem}, earlier piece)", found[0]
    return None


def update_cosines(doc: dict[str, Any], work: Path) -> None:
    for model, workload in {(r["model"], r["workload"]) for r in doc["rows"]}:
        ref = pick_ref(doc, work, model, workload)
        for r in doc["rows"]:
            if (r["model"], r["workload"]) != (model, workload) or r.get("error") or ref is None:
                continue
            r["cos_ref"] = ref[0]
            r["is_ref"] = Path(r["output"]) == ref[1]
            if not r["is_ref"]:
                r["cos_min"], r["cos_mean"], r["cos_n"] = report.cosines(ref[1], Path(r["output"]))
    for model, workload, tool, prec in {
        (r["model"], r["workload"], r["tool"], r["precision"]) for r in doc["rows"]
    }:
        group = [
            r
            for r in doc["rows"]
            if (r["model"], r["workload"], r["tool"], r["precision"]) == (model, workload, tool, prec)
            and not r.get("error")
        ]
        best = max(group, key=lambda r: r["tok_s"], default=None)
        for r in group:
            r["best_budget"] = len(group) > 1 and r is best


def row_from(
    spec: RunSpec, model: str, workload: wl.Workload, budget: int, stats: Any, limit: float, out_h5: Path
) -> dict[str, Any]:
    tokens = workload.tokens  # the same sequences for every tool: count them once
    processed = stats.processed_tokens if stats.processed_tokens >= tokens else tokens
    return {
        "model": model,
        "workload": workload.name,
        "tool": spec.tool,
        "precision": spec.precision,
        "budget": budget,
        "attention": stats.attention,
        "sequences": stats.sequences,
        "tokens": tokens,
        "processed_tokens": processed,
        "batches": stats.batches,
        "seconds": stats.seconds,
        "load_seconds": stats.load_seconds,
        "tok_s": tokens / stats.seconds,
        "seq_s": stats.sequences / stats.seconds,
        "limit_pct": 100.0 * tokens / stats.seconds / limit if limit else None,
        "padding_pct": 100.0 * (processed - tokens) / processed,
        "output": str(out_h5),
        **{k: v for k, v in stats.extra.items() if k != "command"},
    }


class Bench:
    """One benchmark run: the context, the rows so far, and how each tool is run and measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from gpu import GpuMonitor, device_info, matmul_ceiling_tflops

        self.args = args
        self.cuda = torch.cuda.is_available() and not args.cpu
        self.device = torch.device("cuda" if self.cuda else "cpu")
        mode = "cuda" if self.cuda else "cpu"
        self.models = parse_list(
            args.models or ("esm2_t33_650M,esm2_t36_3B" if self.cuda else "esm2_t6_8M,esm2_t12_35M")
        )
        self.runs = expand_runs(args, self.cuda)
        tokens = args.max_tokens or (200_000 if self.cuda else 20_000)
        self.rounds = args.rounds or (1 if self.cuda else 3)
        if self.rounds < 1:
            raise SystemExit("--rounds must be at least 1")
        self.round = 0
        self.budgets = [int(x) for x in parse_list(args.virnuc_budgets or ("16384" if self.cuda else "2048"))]
        self.binary: Path = args.virnuc_trt or default_binary(
            args.stage / "bin" / "virnuc-trt", REPO / "target" / "release" / "virnuc-trt"
        )
        print(f"[bench] virnuc-trt binary: {self.binary}", file=sys.stderr)
        if any(r.tool == "virnuc-trt" for r in self.runs) and not self.binary.exists():
            raise SystemExit(
                f"{self.binary}: no virnuc-trt binary (build it, pass --virnuc-trt, or leave it out of "
                "--peers)"
            )
        now = dt.datetime.now(dt.UTC)
        self.tag = args.tag or f"bench-{mode}-{now:%Y%m%d-%H%M%S}"
        self.results = args.results or Path(os.environ.get("OUT") or REPO / "out" / "bench")
        self.monitor = GpuMonitor() if self.cuda else None
        runs = [f"{r.tool}:{r.precision}" for r in self.runs]
        print(f"[bench] {mode}: models {self.models}, runs {runs}", file=sys.stderr)
        self.workloads = make_workloads(args, self.binary, tokens)
        self.ceiling = matmul_ceiling_tflops(self.cuda)
        self.doc: dict[str, Any] = {
            "context": {
                "mode": mode,
                "device": device_info(self.cuda),
                "date": f"{now:%Y-%m-%d %H:%M} UTC",
                "command": "python3 tools/bench/run.py " + " ".join(sys.argv[1:]),
                "software": software(self.cuda, self.binary),
                "virnuc_trt_binary": binary_identity(self.binary),
                "seed": args.seed,
                "rounds": self.rounds,
                "ceiling_tflops": self.ceiling,
                "limits": {},
                "workloads": {k: vars(w) | {"path": str(w.path)} for k, w in self.workloads.items()},
            },
            "rows": [],
        }

    def save(self) -> Path:
        """Writes the table so far: one row per tool and setting, aggregated over the rounds run."""
        doc = dict(self.doc, rows=aggregate_rounds(self.doc["rows"]))
        update_cosines(doc, self.args.work)
        _, md = report.write(doc, self.results, self.tag)
        print(f"[bench] wrote {md}", file=sys.stderr)
        return md

    def failed(self, spec: RunSpec, model: str, workload: str, budget: int, exc: BaseException) -> None:
        traceback.print_exc()
        self.doc["rows"].append(
            {
                "model": model,
                "workload": workload,
                "tool": spec.tool,
                "precision": spec.precision,
                "budget": budget,
                "round": self.round,
                "error": f"{type(exc).__name__}: {exc}".replace("\n", " "),
            }
        )
        self.save()

    def _gpu_figures(self, row: dict[str, Any], baseline: int | None, t_from: float | None = None) -> None:
        if self.monitor is None:
            return
        row["gpu_busy_pct"] = self.monitor.busy_pct(t_from)
        peak = self.monitor.peak_used()
        if peak is not None and baseline is not None:
            row["peak_gpu_gib"] = (peak - baseline) / 2**30

    def virnuc(self, spec: RunSpec, model: str, limit: float) -> None:
        from virnuc import export_model, run_embed

        args = self.args
        model_dir = args.work / "models" / f"{model}-s{args.seed}-{spec.attention}-{spec.precision}"
        try:
            reexport = args.reexport and self.round == 0
            export_s = export_model(
                REPO, model, args.seed, spec.attention, spec.precision, model_dir, reexport
            )
        except Exception as exc:
            self.failed(spec, model, "-", 0, exc)
            return
        print(f"[bench] {model} {spec.attention} {spec.precision}: export {export_s:.0f} s", file=sys.stderr)
        for workload in self.workloads.values():
            for budget in self.budgets:
                name = f"virnuc-trt-{spec.precision}-{spec.attention}-{budget}.h5"
                out_h5 = args.work / "out" / model / workload.name / name
                baseline = self.monitor.used_bytes() if self.monitor else None
                try:
                    if self.monitor:
                        self.monitor.start()
                    stats, _, _, _, t0 = run_embed(
                        self.binary,
                        model_dir,
                        workload.path,
                        out_h5,
                        budget,
                        "cuda" if self.cuda else "cpu",
                        shlex.split(args.virnuc_args),
                    )
                except Exception as exc:
                    self.failed(spec, model, workload.name, budget, exc)
                    continue
                finally:
                    if self.monitor:
                        self.monitor.stop()
                row = row_from(spec, model, workload, budget, stats, limit, out_h5)
                row["round"] = self.round
                row["export_seconds"] = export_s
                if stats.tokens not in (-1, workload.tokens):
                    row["note"] = f"virnuc-trt counted {stats.tokens} tokens, the workload {workload.tokens}"
                self._gpu_figures(row, baseline, t0 + stats.load_seconds)
                self.doc["rows"].append(row)
                self.save()

    def torch_peer(
        self, spec: RunSpec, model: str, limit: float, config: dict[str, Any], weights: Any
    ) -> None:
        import torch
        from peers import TorchPeer

        args = self.args
        budget = {"hf-eager": args.hf_eager_budget, "hf-sdpa": args.hf_sdpa_budget}.get(
            spec.tool, args.packed_budget
        )
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        baseline = self.monitor.used_bytes() if self.monitor else None
        try:
            peer = TorchPeer(spec.tool, config, weights, self.device, spec.precision, budget)
            peer.warmup()
        except Exception as exc:
            self.failed(spec, model, "-", budget, exc)
            return
        try:
            for workload in self.workloads.values():
                out_h5 = (
                    args.work / "out" / model / workload.name / f"{spec.tool}-{spec.precision}-{budget}.h5"
                )
                try:
                    # Untimed passes first where asked: one-time per-shape costs (cuDNN attention plans,
                    # allocator growth) that a long production run amortizes.
                    for _ in range(args.passes - 1):
                        peer.run(workload.path, out_h5)
                    if self.monitor:
                        self.monitor.start()
                    stats, _, _ = peer.run(workload.path, out_h5)
                except Exception as exc:
                    self.failed(spec, model, workload.name, budget, exc)
                    continue
                finally:
                    if self.monitor:
                        self.monitor.stop()
                row = row_from(spec, model, workload, budget, stats, limit, out_h5)
                row["round"] = self.round
                row["passes"] = args.passes
                self._gpu_figures(row, baseline)
                if self.cuda:
                    row["torch_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                self.doc["rows"].append(row)
                self.save()
        except Exception as exc:
            self.failed(spec, model, "-", budget, exc)
        finally:
            peer.close()

    def run(self) -> Path:
        from packed_esm import esm_flops_per_token
        from peers import canonical_weights_torch

        from virnuc_export.config import load_model_config

        for model in self.models:
            config = load_model_config(model)
            limit = self.ceiling * 1e12 / esm_flops_per_token(config)
            self.doc["context"]["limits"][model] = limit
            weights = None
            for index in range(self.rounds):
                self.round = index
                if self.rounds > 1:
                    print(f"[bench] {model}: round {index + 1} of {self.rounds}", file=sys.stderr)
                for spec in round_order(self.runs, index):
                    if spec.tool == "virnuc-trt":
                        try:
                            self.virnuc(spec, model, limit)
                        except Exception as exc:
                            self.failed(spec, model, "-", 0, exc)
                        continue
                    if weights is None:
                        _, weights, seconds = canonical_weights_torch(model, self.args.seed)
                        print(f"[bench] {model}: random weights in {seconds:.0f} s", file=sys.stderr)
                    self.torch_peer(spec, model, limit, config, weights)
            weights = None
        return self.save()


def bench(args: argparse.Namespace) -> int:
    md = Bench(args).run()
    print(md.read_text())
    return 0


def prepare(args: argparse.Namespace) -> int:
    stage: Path = args.stage
    (stage / "bin").mkdir(parents=True, exist_ok=True)
    (stage / "data").mkdir(parents=True, exist_ok=True)
    if not args.virnuc_trt.exists():
        raise SystemExit(f"{args.virnuc_trt}: build it first: cargo build --release -p virnuc-trt")
    target = stage / "bin" / "virnuc-trt"
    shutil.copy2(args.virnuc_trt, target)
    # The GPU machine's copy of the checkout need not carry this clone's history: the staged commit
    # (with "-dirty" for uncommitted changes) is what the device scripts report.
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True, text=True
    )
    (stage / "commit.txt").write_text((described.stdout.strip() or "?") + "\n")
    if shutil.which("strip"):
        # The release profile keeps line tables (debug = 1); the device needs none and the carry is capped.
        subprocess.run(["strip", "--strip-debug", str(target)], check=False)
    for g in wl.GENOMES:
        shutil.copy2(args.data / g, stage / "data" / g)
    pool = stage / "workloads" / wl.POOL_NAME
    seconds = wl.translate_pool(target, [stage / "data" / g for g in wl.GENOMES], pool)
    records = wl.read_fasta(pool)
    size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
    print(
        f"staged {stage} ({size / 2**20:.1f} MiB): binary, genomes, chunk500 pool of {len(records)} proteins "
        f'(translated in {seconds:.1f} s).\nOn the device, carry ["{_rel(stage)}"].'
    )
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def table(args: argparse.Namespace) -> int:
    doc = report.merge(args.files)
    _, md = report.write(doc, args.out, args.tag)
    print(md.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        return bench(args)
    if args.cmd == "prepare":
        return prepare(args)
    return table(args)


if __name__ == "__main__":
    sys.exit(main())
