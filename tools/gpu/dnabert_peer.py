"""DNABERT-S peers and checks for tools/gpu/dnabert_bench.sh (GPU machine; runs on the CPU too, slowly).

    python tools/gpu/dnabert_peer.py peer   --spans SPANS.fa --tokenizer T.json --seed 0 [--layers 12]
                                            [--batch 64] [--dtype fp16] [--json R.json]
    python tools/gpu/dnabert_peer.py check  --spans SPANS.fa --tokenizer T.json --seed 0 --model EXPORT_DIR
                                            [--sample 64] [--h5 OUT.h5] [--min-cosine 0.999] [--json R.json]

SPANS.fa: the DNA spans `virnuc-trt embed` sends to the model, one record per kept frame, written by
`virnuc-trt translate --dna` (so both tools embed the same sequences and rows match by id).

`peer`: the Broad v2.0-style PyTorch path — sequences in input order, batches of `--batch` padded to their
longest, `torch.nn.functional.scaled_dot_product_attention` with an additive ALiBi + padding mask, fp16 —
on the exporter's seeded random weights (the same weights as `--random dnabert_s --seed N`); prints
tokens/s.

`check`: the export (ONNX Runtime, CUDA EP when available) on packs of a sample of the spans against a
PyTorch fp32 reference (TF32 off, each sequence alone, no padding); with `--h5`, also the rows of a
`virnuc-trt embed` output whose ids are in SPANS.fa. Exit 1 when a cosine is below `--min-cosine`.

The PyTorch model here is written from MosaicBERT's semantics (post-LN, GeGLU, ALiBi) like the exporter's
numpy reference, and is itself checked against that float64 reference in `check` (first sequences).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "export"))

from virnuc_export import dnabert_reference  # noqa: E402
from virnuc_export.weights import RandomWeights  # noqa: E402


def read_fasta(path: Path) -> list[tuple[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    out: list[tuple[str, str]] = []
    name, chunks = None, []
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if name is not None:
                    out.append((name, "".join(chunks).upper()))
                name, chunks = line[1:].split()[0] if len(line) > 1 else "", []
            elif line:
                chunks.append(line)
    if name is not None:
        out.append((name, "".join(chunks).upper()))
    return out


def tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()  # as VirNucPro's `tokenizer(seq)` call: the released file carries both at 2000
    tok.no_padding()
    return tok


def torch_model(seed: int, layers: int | None, config: str = "dnabert_s") -> tuple[Any, dict[str, Any]]:
    """(an nn.Module computing DNABERT-S states for padded ids [B, S] + mask, the config), random weights
    of `--random dnabert_s --seed N`."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    src = RandomWeights(config, seed, layers=layers)
    cfg = src.config
    w = {k: torch.from_numpy(v) for k, v in src.items()}
    slopes = torch.from_numpy(dnabert_reference.alibi_slopes_f32(cfg["num_heads"]))

    class Dnabert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.ParameterDict(
                {k.replace(".", "__"): nn.Parameter(v, requires_grad=False) for k, v in w.items()}
            )
            self.register_buffer("slopes", slopes)

        def g(self, name: str) -> torch.Tensor:
            return self.p[name.replace(".", "__")]

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            nh, h, ffn = cfg["num_heads"], cfg["hidden_size"], cfg["ffn_size"]
            d, eps = h // nh, cfg["layer_norm_eps"]
            b, s = ids.shape
            x = F.embedding(ids, self.g("embeddings.word_embeddings.weight"))
            x = x + self.g("embeddings.token_type_embeddings.weight")[0]
            x = F.layer_norm(
                x, (h,), self.g("embeddings.LayerNorm.weight"), self.g("embeddings.LayerNorm.bias"), eps
            )
            pos = torch.arange(s, device=ids.device)
            alibi = -self.slopes.to(x.dtype)[:, None, None] * (pos[None, :] - pos[:, None]).abs().to(x.dtype)
            pad = torch.zeros(b, 1, 1, s, dtype=x.dtype, device=ids.device).masked_fill(
                ~mask[:, None, None, :], -1e4
            )
            bias = alibi[None] + pad  # [B, heads, S, S]
            for i in range(cfg["num_layers"]):
                pre = f"encoder.layer.{i}"
                qkv = F.linear(
                    x, self.g(f"{pre}.attention.self.Wqkv.weight"), self.g(f"{pre}.attention.self.Wqkv.bias")
                )
                q, k, v = qkv.view(b, s, 3, nh, d).permute(2, 0, 3, 1, 4)
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / math.sqrt(d))
                ctx = ctx.transpose(1, 2).reshape(b, s, h)
                o = F.linear(
                    ctx,
                    self.g(f"{pre}.attention.output.dense.weight"),
                    self.g(f"{pre}.attention.output.dense.bias"),
                )
                ln = f"{pre}.attention.output.LayerNorm"
                x = F.layer_norm(o + x, (h,), self.g(f"{ln}.weight"), self.g(f"{ln}.bias"), eps)
                gg = F.linear(x, self.g(f"{pre}.mlp.gated_layers.weight"))
                act = F.gelu(gg[..., :ffn]) * gg[..., ffn:]
                o = F.linear(act, self.g(f"{pre}.mlp.wo.weight"), self.g(f"{pre}.mlp.wo.bias"))
                x = F.layer_norm(
                    o + x,
                    (h,),
                    self.g(f"{pre}.mlp.layernorm.weight"),
                    self.g(f"{pre}.mlp.layernorm.bias"),
                    eps,
                )
            return x

    return Dnabert().eval(), cfg


def padded_means(model: Any, batches: list[list[list[int]]], device: str, dtype: Any) -> list[np.ndarray]:
    import torch

    out = []
    with torch.no_grad():
        for batch in batches:
            s = max(len(t) for t in batch)
            ids = torch.zeros(len(batch), s, dtype=torch.long)
            mask = torch.zeros(len(batch), s, dtype=torch.bool)
            for i, t in enumerate(batch):
                ids[i, : len(t)] = torch.tensor(t)
                mask[i, : len(t)] = True
            ids, mask = ids.to(device), mask.to(device)
            states = model(ids, mask)
            m = mask[..., None].to(states.dtype)
            out.append(((states * m).sum(1) / m.sum(1)).float().cpu().numpy())
    return out


def cmd_peer(args: argparse.Namespace) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    tok = tokenizer(Path(args.tokenizer))
    seqs = [tok.encode(dna).ids for _, dna in read_fasta(Path(args.spans))]
    model, _ = torch_model(args.seed, args.layers, args.config)
    model = model.to(device=device, dtype=dtype)
    batches = [seqs[i : i + args.batch] for i in range(0, len(seqs), args.batch)]
    padded_means(model, batches[:2], device, dtype)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    padded_means(model, batches, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for t in seqs)
    padded = sum(len(b) * max(len(t) for t in b) for b in batches)
    result = {
        "peer": f"pytorch padded SDPA {args.dtype}, batch {args.batch}", "device": device,
        "torch": torch.__version__, "sequences": len(seqs), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall, "padding_fraction": 1 - tokens / padded,
    }  # fmt: skip
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def onnxruntime_module(cuda: bool) -> Any:
    """onnxruntime-gpu on the GPU machine (its image has only the CPU package), else the installed one."""
    if cuda:
        import ort_gpu  # beside this script

        return ort_gpu.load()
    import onnxruntime

    return onnxruntime


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = tokenizer(Path(args.tokenizer))
    records = read_fasta(Path(args.spans))
    rows = np.unique(np.linspace(0, len(records) - 1, num=min(args.sample, len(records))).astype(int))
    sample = [records[r] for r in rows]
    seqs = [tok.encode(dna).ids for _, dna in sample]
    meta = json.loads((Path(args.model) / "model.json").read_text())
    model, cfg = torch_model(args.seed, meta["model"]["num_layers"], args.config)
    model = model.to(device)
    ref = np.concatenate(padded_means(model, [[t] for t in seqs], device, torch.float32))
    # The PyTorch reference itself against the float64 numpy transcription of the original code.
    src = RandomWeights(args.config, args.seed, layers=meta["model"]["num_layers"])
    w64 = {k: v.astype(np.float64) for k, v in src.items()}
    own = np.stack(
        [dnabert_reference.mean_all_tokens(dnabert_reference.forward(w64, cfg, t)) for t in seqs[:4]]
    )
    ref_vs_f64 = float(cosines(ref[:4], own).min())
    result: dict[str, Any] = {
        "sample": len(seqs), "attention": meta["attention"], "precision": meta["precision"],
        "torch_fp32_vs_float64_min_cosine": ref_vs_f64,
    }  # fmt: skip
    ok = ref_vs_f64 >= 0.99999
    # The `virnuc` flavor's VarlenAttention is a custom op that only the Rust runtime registers: its
    # export is checked through embed's HDF5 below, not through a Python session.
    if meta["attention"] != "virnuc":
        ort = onnxruntime_module(device == "cuda")
        providers = [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
        ]
        sess = ort.InferenceSession(str(Path(args.model) / "model.onnx"), providers=providers)
        got = []
        for i in range(0, len(seqs), 16):
            part = seqs[i : i + 16]
            feeds = {
                "input_ids": np.concatenate([np.asarray(t, np.int64) for t in part]),
                "position_ids": np.concatenate([np.arange(len(t), dtype=np.int64) for t in part]),
                "cu_seqlens": np.cumsum([0, *(len(t) for t in part)]).astype(np.int32),
            }
            got.append(sess.run(["mean"], feeds)[0])
        export_cos = cosines(np.concatenate(got).astype(np.float64), ref.astype(np.float64))
        result["providers"] = sess.get_providers()
        result["export_min_cosine"] = float(export_cos.min())
        result["export_mean_cosine"] = float(export_cos.mean())
        ok = ok and export_cos.min() >= args.min_cosine
    if args.h5:
        import h5py

        with h5py.File(args.h5, "r") as f:
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in f["sequence_ids"][:]]
            emb = f["embeddings"][:]
        index = {rid: i for i, (rid, _) in enumerate(sample)}
        hits = [(j, index[rid]) for j, rid in enumerate(ids) if rid in index]
        result["h5_rows_matched"] = len(hits)
        if hits:
            h5_cos = cosines(
                emb[[j for j, _ in hits]].astype(np.float64), ref[[i for _, i in hits]].astype(np.float64)
            )
            result["h5_min_cosine"] = float(h5_cos.min())
            ok = ok and h5_cos.min() >= args.min_cosine
    if meta["attention"] == "virnuc" and not result.get("h5_rows_matched"):
        ok = False  # nothing of the export was checked
    result["pass"] = bool(ok)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("peer", "check"):
        c = sub.add_parser(name)
        c.add_argument("--spans", required=True)
        c.add_argument("--tokenizer", required=True)
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--config", default="dnabert_s", help="models/NAME.yaml or a YAML path")
        c.add_argument("--json")
    peer = sub.choices["peer"]
    peer.add_argument("--layers", type=int)
    peer.add_argument("--batch", type=int, default=64)
    peer.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    check = sub.choices["check"]
    check.add_argument("--model", required=True, help="export folder (model.onnx, model.json)")
    check.add_argument("--sample", type=int, default=64)
    check.add_argument("--h5")
    check.add_argument("--min-cosine", type=float, default=0.999)
    args = p.parse_args(argv)
    if args.cmd in ("peer",) and args.batch < 1:
        p.error("--batch must be positive")
    return {"peer": cmd_peer, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
