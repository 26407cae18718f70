#!/usr/bin/env python3
"""CPU benchmark of `virnuc-trt predict` against the same pipeline run as VirNucPro runs it (issue 12).

    source tools/setup.sh && cargo build --release -p virnuc-trt
    python tools/bench/predict_cpu.py [--fasta F.fa ...] [--chunk 500] [--esm esm2_t6_8M]
        [--dnabert-layers 12] [--work out/bench-predict] [--passes 1] [--out out/bench-predict/result.md]

Both sides get the same random weights (the exporter's seeded RandomWeights, seed 0; classifier seed 1)
and the same frames, in the same run:

  virnuc-trt   `virnuc-trt predict --ep cpu` (release binary, `virnuc` attention: the CPU op), a fresh
               process, as a user runs it; its own report's wall time (model load included).
  VirNucPro    its `prediction.py` path in PyTorch fp32 on the CPU: frames from its `units.py` logic
               (tests/e2e/virnucpro_reference.py), DNABERT-S one sequence at a time as
               `extract_DNABERT_S` (a PyTorch MosaicBERT forward written here from the original
               `bert_layers.py`; VirNucPro loads it with trust_remote_code, which needs the network),
               ESM-2 batched as `extract_esm` (HF transformers `EsmModel`, fair-esm's length-sorted
               batches of 2048 tokens, mean over residues 1..min(len, 1024)), then MLPClassifier and
               softmax in torch. Model construction counted apart from the forward passes.

Prints one Markdown table (and writes it to --out) with frames/s, the speed-up, and the largest score
difference between the two (a correctness check of both: ≤ 1e-4 expected). Run it only on a quiet
machine (timings of a shared machine are noise).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "export"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import virnucpro_reference as ref  # noqa: E402

from virnuc_export.dnabert_reference import alibi_slopes_f32  # noqa: E402
from virnuc_export.reference import hf_model_from_source  # noqa: E402
from virnuc_export.weights import RandomWeights  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


class DnabertS(torch.nn.Module):
    """DNABERT-S (MosaicBERT) forward for one unpadded sequence, fp32, from `BertModel` state-dict
    names: embeddings LayerNorm(word + token type 0); per layer post-LN self-attention with ALiBi
    (-slope·|i-j|) and the GeGLU MLP (gelu(first half) · second half)."""

    def __init__(self, weights: dict[str, np.ndarray], config: dict[str, object]) -> None:
        super().__init__()
        self.w = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()}
        self.nh = int(config["num_heads"])  # type: ignore[call-overload]
        self.layers = int(config["num_layers"])  # type: ignore[call-overload]
        self.inter = int(config["ffn_size"])  # type: ignore[call-overload]
        self.eps = float(config["layer_norm_eps"])  # type: ignore[arg-type]
        self.slopes = torch.from_numpy(alibi_slopes_f32(self.nh))

    def ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(
            x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps
        )

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w, n, nh = self.w, ids.shape[0], self.nh
        emb = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
        x = self.ln(emb, "embeddings.LayerNorm")
        pos = torch.arange(n)
        alibi = -self.slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()[None].float()
        d = x.shape[1] // nh
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            qkv = torch.nn.functional.linear(
                x, w[f"{p}.attention.self.Wqkv.weight"], w[f"{p}.attention.self.Wqkv.bias"]
            )
            q, k, v = qkv.view(n, 3, nh, d).permute(1, 2, 0, 3)
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + alibi, dim=-1)
            ctx = (probs @ v).transpose(0, 1).reshape(n, -1)
            dense = torch.nn.functional.linear(
                ctx, w[f"{p}.attention.output.dense.weight"], w[f"{p}.attention.output.dense.bias"]
            )
            x = self.ln(dense + x, f"{p}.attention.output.LayerNorm")
            g = x @ w[f"{p}.mlp.gated_layers.weight"].T
            h = torch.nn.functional.gelu(g[:, : self.inter]) * g[:, self.inter :]
            out = torch.nn.functional.linear(h, w[f"{p}.mlp.wo.weight"], w[f"{p}.mlp.wo.bias"])
            x = self.ln(out + x, f"{p}.mlp.layernorm")
        return x


def fair_esm_batches(lengths: list[int], toks_per_batch: int = 2048) -> list[list[int]]:
    """fair-esm `FastaBatchedDataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, buf, max_len = [], [], 0
    for i in order:
        sz = lengths[i] + 1
        if max(sz, max_len) * (len(buf) + 1) > toks_per_batch and buf:
            batches.append(buf)
            buf, max_len = [], 0
        max_len = max(max_len, sz)
        buf.append(i)
    if buf:
        batches.append(buf)
    return batches


def virnucpro_run(
    fasta: list[Path], chunk: int, esm: str, layers: int, clf_dir: Path, tokenizer: Path
) -> dict:
    from tokenizers import Tokenizer

    torch.set_grad_enabled(False)
    t0 = time.monotonic()
    frames = [f for p in fasta for f in ref.kept_frames(p, chunk)]
    t_frames = time.monotonic() - t0
    src = RandomWeights("dnabert_s", 0, layers=layers)
    dna = DnabertS(src.state_dict(), src.config)
    esm_model = hf_model_from_source(RandomWeights(esm, 0)).eval()
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_truncation()
    tok.no_padding()
    clf = ref.Classifier.load(clf_dir)
    t_load = time.monotonic() - t0 - t_frames

    t1 = time.monotonic()
    dna_means = [dna(torch.tensor(tok.encode(span).ids)).mean(0) for _, span, _ in frames]
    t_dna = time.monotonic() - t1

    t2 = time.monotonic()
    esm_means: list[torch.Tensor | None] = [None] * len(frames)
    proteins = [p for _, _, p in frames]
    for batch in fair_esm_batches([len(p) for p in proteins]):
        width = max(len(proteins[i]) for i in batch) + 2
        ids = torch.full((len(batch), width), 1, dtype=torch.long)  # <pad>
        for r, i in enumerate(batch):
            ids[r, : len(proteins[i]) + 2] = torch.tensor(ref.esm_ids(proteins[i]))
        hidden = esm_model(input_ids=ids, attention_mask=(ids != 1).long()).last_hidden_state
        for r, i in enumerate(batch):
            n = min(1024, len(proteins[i]))
            esm_means[i] = hidden[r, 1 : n + 1].mean(0)
    t_esm = time.monotonic() - t2

    t3 = time.monotonic()
    x = torch.stack([torch.cat([d, e]) for d, e in zip(dna_means, esm_means, strict=True)])  # type: ignore[misc]
    probs = clf.probs(x.numpy())
    t_clf = time.monotonic() - t3
    return {
        "ids": [f[0] for f in frames],
        "probs": probs,
        "frames_s": t_frames,
        "load_s": t_load,
        "dnabert_s": t_dna,
        "esm_s": t_esm,
        "classifier_s": t_clf,
        "total_s": time.monotonic() - t0,
    }


def export(args: list[str], out: Path) -> Path:
    # The exporter runs in export/: a relative --out would land there, not where the caller looks.
    out = out.resolve()
    if not (out / "model.json").exists() and not (out / "classifier.json").exists():
        r = subprocess.run(
            [sys.executable, "-m", "virnuc_export", *args, "--out", str(out)], cwd=ROOT / "export"
        )
        if r.returncode != 0:
            sys.exit(f"export {args} failed")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_fasta = [FIXTURES / "lambda_virus.fa", FIXTURES / "klebsiella_HS11286_32kb.fa"]
    p.add_argument("--fasta", type=Path, nargs="+", default=default_fasta)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--esm", default="esm2_t6_8M")
    p.add_argument("--dnabert-layers", type=int, default=12)
    p.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "virnuc-trt")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-predict")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    esm_dir = export(["--random", a.esm, "--seed", "0", "--attention", "virnuc"], a.work / a.esm)
    dna_dir = export(
        ["--random", "dnabert_s", "--layers", str(a.dnabert_layers), "--seed", "0", "--attention", "virnuc"],
        a.work / f"dnabert_s_{a.dnabert_layers}l",
    )
    esm_dim = json.loads((esm_dir / "model.json").read_text())["model"]["hidden_size"]
    clf_dir = export(
        ["--random-classifier", "--esm-dim", str(esm_dim), "--seed", "1"], a.work / f"clf{esm_dim}"
    )
    rows = []
    for pass_no in range(1, a.passes + 1):
        out = a.work / f"predict_{pass_no}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t = time.monotonic()
        r = subprocess.run(
            [str(a.bin), "predict", *map(str, a.fasta), "--esm", str(esm_dir), "--dnabert", str(dna_dir),
             "--classifier", str(clf_dir), "--chunk", str(a.chunk), "--out-dir", str(out), "--ep", "cpu",
             "-q"],
            capture_output=True, text=True,
        )  # fmt: skip
        ours_s = time.monotonic() - t
        if r.returncode != 0:
            sys.exit(f"virnuc-trt predict failed:\n{r.stderr}")
        report = json.loads((out / "predict_report.json").read_text())
        got = ref.read_results_as_pandas(out / "prediction_results.txt")
        peer = virnucpro_run(a.fasta, a.chunk, a.esm, a.dnabert_layers, clf_dir, dna_dir / "tokenizer.json")
        assert [g[0] for g in got] == peer["ids"], "the two runs disagree on the frames"
        diff = float(np.max(np.abs(np.array([[g[2], g[3]] for g in got]) - peer["probs"])))
        n = len(got)
        rows.append(
            f"| {pass_no} | {n} | {ours_s:.2f} | {report['predict_wall_s']:.2f} | {peer['total_s']:.2f} "
            f"(DNABERT-S {peer['dnabert_s']:.2f}, ESM-2 {peer['esm_s']:.2f}, load {peer['load_s']:.2f}) | "
            f"{n / ours_s:.1f} | {n / peer['total_s']:.1f} | {peer['total_s'] / ours_s:.2f}x | {diff:.1e} |"
        )
    table = "\n".join(
        [
            f"CPU predict, {a.esm} + DNABERT-S ({a.dnabert_layers} layers) + classifier, random weights, "
            f"chunk {a.chunk}, inputs {', '.join(p.name for p in a.fasta)}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            "",
            "| pass | frames | virnuc-trt s (process) | virnuc-trt s (engines) | VirNucPro-style s | "
            "virnuc-trt frames/s | VirNucPro frames/s | speed-up | max score diff |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
