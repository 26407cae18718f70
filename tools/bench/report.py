"""Results: one JSON document (rows + context) and the markdown table pasted into BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from peers import read_embeddings_h5


def cosines(ref_h5: Path, h5: Path) -> tuple[float, float, int]:
    """Per-sequence cosine of mean embeddings, matched by id: (min, mean, sequences compared)."""
    ref_ids, ref = read_embeddings_h5(ref_h5)
    ids, emb = read_embeddings_h5(h5)
    where = {k: i for i, k in enumerate(ref_ids)}
    pairs = [(where[k], i) for i, k in enumerate(ids) if k in where]
    if not pairs:
        raise ValueError(f"{h5} and {ref_h5} share no sequence ids")
    a = ref[[p[0] for p in pairs]].astype(np.float64)
    b = emb[[p[1] for p in pairs]].astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return float(cos.min()), float(cos.mean()), len(pairs)


def _f(x: Any, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def _flops(tflops: float) -> str:
    return f"{tflops:.0f} TFLOP/s" if tflops >= 10 else f"{tflops * 1000:.0f} GFLOP/s"


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def markdown(doc: dict[str, Any]) -> str:
    ctx = doc["context"]
    gpu = ctx["mode"] == "cuda"
    lines = [
        f"### {'GPU' if gpu else 'CPU'} end to end: {ctx['device']['name']} "
        f"(driver {ctx['device']['driver']}), {ctx['date']}",
        "",
        f"Command: `{ctx['command']}`",
        "",
        f"Software: {ctx['software']}. Random weights (seed {ctx['seed']}), identical for every tool. "
        "Tokens/s counts real tokens only (`<cls>`/`<eos>` included, padding not); each run is FASTA in to "
        "HDF5 out, model load (and export) timed apart.",
        "",
        f"Matrix-product ceiling measured in this run: {_flops(ctx['ceiling_tflops'])} "
        f"({'fp16' if gpu else 'fp32'}); arithmetic limit = ceiling / (24·H²·layers FLOPs per token): "
        + ", ".join(f"{m} {_rate(v)} tok/s" for m, v in ctx["limits"].items())
        + ".",
        "",
        "Workloads: "
        + "; ".join(
            f"`{w['name']}` {w['sequences']} seqs, {w['tokens']} tokens ({w['note']})"
            for w in ctx["workloads"].values()
        )
        + ".",
        "",
        *(
            [
                f"Each tool ran {ctx['rounds']} alternating rounds (in order, then in reverse order); "
                "tokens/s, seq/s and run s are the median round, best = the fastest round.",
                "",
            ]
            if ctx.get("rounds", 1) > 1
            else []
        ),
        "| model | workload | tool | prec. | budget | attention | tokens/s | seq/s | % of limit | GPU busy | "
        "peak GPU mem | padding | cos vs ref min / mean | run s | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if r.get("error"):
            lines.append(
                f"| {r['model']} | {r['workload']} | {r['tool']} | {r['precision']} | {r['budget']} | "
                f"| failed: {r['error'][:80]} | | | | | | | | |"
            )
            continue
        cos = (
            "ref"
            if r.get("is_ref")
            else f"{r['cos_min']:.7f} / {r['cos_mean']:.7f}"
            if r.get("cos_min") is not None
            else "-"
        )
        load = _f(r.get("load_seconds"), ".1f")
        if r.get("export_seconds"):
            load += f" (+ export {r['export_seconds']:.0f})"
        if r.get("load_in_seconds"):
            load = "in run s"
        best = " **best**" if r.get("best_budget") else ""
        best += f" ({r['passes']} passes)" if r.get("passes", 1) > 1 else ""
        rate = _rate(r["tok_s"])
        run_s = f"{r['seconds']:.1f}"
        if r.get("rounds", 1) > 1:
            rate += f" (best {_rate(r['tok_s_best'])})"
            run_s += f" (min {r['seconds_min']:.1f})"
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['tool']} | {r['precision']} | {r['budget']}{best} | "
            f"{r['attention']} | {rate} | {r['seq_s']:.0f} | {_f(r.get('limit_pct'), '.0f')}% | "
            f"{_f(r.get('gpu_busy_pct'), '.0f')}{'%' if r.get('gpu_busy_pct') is not None else ''} | "
            f"{_f(r.get('peak_gpu_gib'), '.1f')}{' GiB' if r.get('peak_gpu_gib') is not None else ''} | "
            f"{r['padding_pct']:.1f}% | {cos} | {run_s} | {load} |"
        )
    if gpu:
        lines += [
            "",
            "fp32 matrix products: PyTorch defaults (TF32 off) for the HF peers; ONNX Runtime's CUDA "
            "provider enables TF32 by default (the cosine column shows what that costs). Peak GPU memory: "
            "device memory in use above the level before the tool's model load (virnuc-trt: its own CUDA "
            "context included).",
        ]
    refs = sorted({f"{r['model']}/{r['workload']}: {r['cos_ref']}" for r in doc["rows"] if r.get("cos_ref")})
    if refs:
        lines += ["", "Cosine reference per model/workload: " + "; ".join(refs) + "."]
    ratios = doc.get("ratios", [])
    if ratios:
        lines += ["", "Ratios: " + "; ".join(ratios) + "."]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """The targets of issue 7: virnuc-trt fp16 over torch-packed, virnuc-trt fp32 over HF eager fp32,
    virnuc-trt over HF (CPU)."""

    def best(model: str, wl: str, tool: str, prec: str) -> float | None:
        xs = [
            r["tok_s"]
            for r in rows
            if not r.get("error")
            and (r["model"], r["workload"], r["tool"], r["precision"]) == (model, wl, tool, prec)
        ]
        return max(xs) if xs else None

    out = []
    for model, wl in sorted({(r["model"], r["workload"]) for r in rows}):
        for prec, peer in (("fp16", "torch-packed"), ("fp32", "hf-eager"), ("fp32", "hf-sdpa")):
            a = best(model, wl, "virnuc-trt", prec)
            b = best(model, wl, peer, "fp16" if peer == "torch-packed" else prec)
            if a and b:
                out.append(f"{model} {wl} virnuc-trt {prec} / {peer} = {a / b:.2f}x")
    return out


def write(doc: dict[str, Any], out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc["ratios"] = ratios(doc["rows"])
    js = out_dir / f"{tag}.json"
    md = out_dir / f"{tag}.md"
    js.write_text(json.dumps(doc, indent=2))
    md.write_text(markdown(doc))
    return js, md


def merge(paths: list[Path]) -> dict[str, Any]:
    """Several result files of one machine (a run split into pieces) → one document."""
    docs = [json.loads(p.read_text()) for p in paths]
    merged = dict(docs[0])
    merged["rows"] = [r for d in docs for r in d["rows"]]
    merged["context"] = dict(docs[0]["context"])
    merged["context"]["command"] = " ; ".join(d["context"]["command"] for d in docs)
    merged["context"]["workloads"] = {k: v for d in docs for k, v in d["context"]["workloads"].items()}
    merged["context"]["limits"] = {k: v for d in docs for k, v in d["context"]["limits"].items()}
    return merged
