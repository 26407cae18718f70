"""VirNucPro's prediction path, restated in Python/numpy from its code, as an independent reference.

Li-Jing-1997/VirNucPro (`prediction.py`: `make_predictdata`, `predict`, `determine_virus`; `units.py`:
`split_fasta_chunk`, `translate_dna`, `reverse_complement`, `identify_seq`, `extract_DNABERT_S`,
`extract_esm`, `merge_data`). The two models run through onnxruntime's Python API on the same exported
graphs (one sequence at a time, as VirNucPro runs DNABERT-S), tokenized by the Python `tokenizers`
library (DNABERT-S) and the ESM-2 alphabet; the classifier is numpy on `classifier.safetensors`. Nothing
here calls the Rust runtime.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CODONS = {
    "TCA": "S", "TCC": "S", "TCG": "S", "TCT": "S", "TTC": "F", "TTT": "F", "TTA": "L", "TTG": "L",
    "TAC": "Y", "TAT": "Y", "TAA": "*", "TAG": "*", "TGC": "C", "TGT": "C", "TGA": "*", "TGG": "W",
    "CTA": "L", "CTC": "L", "CTG": "L", "CTT": "L", "CCA": "P", "CCC": "P", "CCG": "P", "CCT": "P",
    "CAC": "H", "CAT": "H", "CAA": "Q", "CAG": "Q", "CGA": "R", "CGC": "R", "CGG": "R", "CGT": "R",
    "ATA": "I", "ATC": "I", "ATT": "I", "ATG": "M", "ACA": "T", "ACC": "T", "ACG": "T", "ACT": "T",
    "AAC": "N", "AAT": "N", "AAA": "K", "AAG": "K", "AGC": "S", "AGT": "S", "AGA": "R", "AGG": "R",
    "GTA": "V", "GTC": "V", "GTG": "V", "GTT": "V", "GCA": "A", "GCC": "A", "GCG": "A", "GCT": "A",
    "GAC": "D", "GAT": "D", "GAA": "E", "GAG": "E", "GGA": "G", "GGC": "G", "GGG": "G", "GGT": "G",
}  # fmt: skip
ESM_ALPHABET = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """Bio.SeqIO 'fasta': id = the title's first word, sequence lines joined (whitespace removed)."""
    records: list[tuple[str, list[str]]] = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            title = line[1:].rstrip()
            records.append((title.split(None, 1)[0] if title else "", []))
        elif records:
            records[-1][1].append("".join(line.split()))
    return [(i, "".join(s)) for i, s in records]


def split_chunks(seq: str, chunk_size: int) -> list[str]:
    """`split_fasta_chunk` for one record."""
    n = -(-len(seq) // chunk_size)
    repeat = n * chunk_size - len(seq)
    lower = int(repeat / n)
    need_up = repeat - lower * (n - 1)
    steps = [lower + 1] * need_up + [lower] * (n - 1 - need_up) + [0]
    out, move = [], 0
    for a, b in zip(range(0, len(seq), chunk_size), steps, strict=False):
        out.append(seq[a - move : a - move + chunk_size] if a > 1 else seq[a : a + chunk_size])
        move += b
    return out


def reverse_complement(s: str) -> str:
    return s.translate(str.maketrans("ACGTacgt", "TGCAtgca"))[::-1]


def frames(seqid: str, seq: str) -> list[tuple[str, str, str]]:
    """`identify_seq` (prediction branch) with `make_predictdata`'s empty-protein filter:
    (frame id, DNA span, protein) of every stop-free frame."""

    def tr(s: str, f: int) -> str:
        return "".join(CODONS.get(s[i : i + 3], "") for i in range(f, len(s) - 2, 3))

    proteins = [tr(seq, f) for f in range(3)] + [tr(reverse_complement(seq), f) for f in range(3)]
    out = []
    for num, p in enumerate(proteins, start=1):
        if "*" in p or p == "":
            continue
        n3 = len(p) * 3
        if num <= 3:
            out.append((f"{seqid}F{num}", seq[num - 1 : num + n3], p))
        else:
            out.append((f"{seqid}R{num - 3}", reverse_complement(seq)[num - 3 - 1 : num - 3 + n3], p))
    return out


def kept_frames(fasta: Path, chunk: int) -> list[tuple[str, str, str]]:
    out = []
    for rid, seq in read_fasta(fasta):
        for k, c in enumerate(split_chunks(seq, chunk), start=1):
            out.extend(frames(f"{rid}_chunk_{k}", c.upper()))
    return out


class Graph:
    """One exported graph in onnxruntime, run on one sequence at a time."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def mean(self, ids: list[int]) -> np.ndarray:
        feed = {
            "input_ids": np.asarray(ids, np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64),
            "cu_seqlens": np.asarray([0, len(ids)], np.int32),
        }
        (mean,) = self.session.run(["mean"], {k: v for k, v in feed.items() if k in self.inputs})
        return mean[0]


def esm_ids(protein: str) -> list[int]:
    return [0, *(ESM_ALPHABET.index(c) for c in protein), 2]


@dataclass
class Classifier:
    t: dict[str, np.ndarray]
    eps: float

    @classmethod
    def load(cls, d: Path) -> Classifier:
        import json

        from safetensors.numpy import load_file

        meta = json.loads((d / "classifier.json").read_text())
        return cls(load_file(str(d / "classifier.safetensors")), float(meta["batch_norm_eps"]))

    def probs(self, x: np.ndarray) -> np.ndarray:
        """`MLPClassifier.forward` in eval mode, then `F.softmax(outputs, dim=1)`, in float32."""
        t = self.t
        h = x.astype(np.float32) @ t["hidden_layer.weight"].T + t["hidden_layer.bias"]
        h = (h - t["bn1.running_mean"]) / np.sqrt(t["bn1.running_var"] + np.float32(self.eps))
        h = np.maximum(h * t["bn1.weight"] + t["bn1.bias"], 0)
        z = h @ t["output_layer.weight"].T + t["output_layer.bias"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def predict(
    fasta: Path, chunk: int, esm_dir: Path, dnabert_dir: Path, classifier_dir: Path
) -> tuple[list[str], np.ndarray]:
    """Frame ids and probabilities [N, 2] as VirNucPro computes them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dnabert_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    esm, dna = Graph(esm_dir), Graph(dnabert_dir)
    rows, ids = [], []
    for fid, span, protein in kept_frames(fasta, chunk):
        d = dna.mean(tok.encode(span).ids)  # extract_DNABERT_S: tokenizer(seq), mean over all tokens
        e = esm.mean(esm_ids(protein))  # extract_esm: mean over residues 1..min(len, 1024)
        rows.append(np.concatenate([d, e]))  # merge_data: torch.cat((nucleotide, protein))
        ids.append(fid)
    if not rows:
        return [], np.zeros((0, 2), np.float32)
    return ids, Classifier.load(classifier_dir).probs(np.stack(rows))


def results_text(ids: list[str], probs: np.ndarray) -> str:
    """prediction_results.txt as `make_predictdata` writes it."""
    label = {1: "virus", 0: "others"}
    lines = ["Sequence_ID\tPrediction\tscore1\tscore2\n"]
    for i, p in zip(ids, probs, strict=True):
        lines.append(f"{i}\t{label[int(np.argmax(p))]}\t" + "\t".join(map(str, p)) + "\n")
    return "".join(lines)


def read_results_as_pandas(path: Path) -> list[tuple[str, str, float, float]]:
    """`pd.read_csv(path, sep="\\t")` of prediction_results.txt, with the csv module: header checked,
    Sequence_ID and Prediction strings, scores float64."""
    with path.open(newline="") as f:
        r = csv.reader(f, delimiter="\t")
        assert next(r) == ["Sequence_ID", "Prediction", "score1", "score2"]
        return [(row[0], row[1], float(row[2]), float(row[3])) for row in r]


def highestscore_by_pandas(txt: Path) -> tuple[list[tuple[str, str, float, float]], str]:
    """VirNucPro's own last step, run with pandas as `prediction.py` runs it: `read_csv` of
    prediction_results.txt, `Modified_ID = Sequence_ID[:-2]`, `groupby(...).apply(determine_virus)`,
    `to_csv(sep="\\t", index=False)`. Returns the rows pandas read and the csv text it writes."""
    import pandas as pd

    df = pd.read_csv(txt, sep="\t")
    rows = [
        (str(r.Sequence_ID), str(r.Prediction), float(r.score1), float(r.score2))
        for r in df.itertuples(index=False)
    ]
    df["Modified_ID"] = df["Sequence_ID"].str[:-2]

    def determine_virus(group: pd.DataFrame) -> pd.Series:
        return pd.Series({"Is_Virus": group["score2"].max() >= group["score1"].max()})

    grouped = df[["Modified_ID", "score1", "score2"]].groupby("Modified_ID", group_keys=False)
    out = grouped[["score1", "score2"]].apply(determine_virus).reset_index()
    return rows, out.to_csv(sep="\t", index=False)


def highestscore_text(rows: list[tuple[str, str, float, float]]) -> str:
    """`df.groupby("Modified_ID").apply(determine_virus).reset_index().to_csv(sep="\\t", index=False)`."""
    groups: dict[str, list[float]] = {}
    for sid, _, s1, s2 in rows:
        g = groups.setdefault(sid[:-2], [-np.inf, -np.inf])
        g[0], g[1] = max(g[0], s1), max(g[1], s2)
    out = ["Modified_ID\tIs_Virus\n"]
    for k in sorted(groups):
        out.append(f"{k}\t{groups[k][1] >= groups[k][0]}\n")
    return "".join(out)
