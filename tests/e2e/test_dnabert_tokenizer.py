"""The runtime's DNABERT-S tokenizer (Rust `tokenizers`) against Python's, id for id.

Inputs: the DNA spans `embed` gives a DNABERT-S model on lambda and on the Klebsiella genome (both
span rules), whole genomes far past the tokenizer file's 2000-token truncation, and edge cases (N
runs, IUPAC codes, lowercase, gaps and stops, empty input). Tokenizers: the real DNABERT-S file in
`../shared/data/dnabert_s` (skipped, saying so, when absent) and one trained here with Python
`tokenizers` on lambda in the same shape (BPE, `[UNK]`, Whitespace pre-tokenizer, `[CLS] $A [SEP]`,
truncation and padding at 2000 like the real file), so the always-on test needs nothing outside the
repository. References: Python `tokenizers` with truncation/padding off, and `transformers`'
`tokenizer(seq)` — the call VirNucPro makes.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from e2e_helpers import FIXTURES, ROOT, run

# ../shared/data beside the checkout (CI, the main checkout), or VIRNUC_SHARED_DATA.
REAL_TOKENIZER = Path(os.environ.get("VIRNUC_SHARED_DATA", ROOT.parent / "shared" / "data")) / "dnabert_s"


def read_fasta(path: Path) -> list[tuple[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[tuple[str, str]] = []
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                records.append((line[1:].split()[0], ""))
            elif records:
                records[-1] = (records[-1][0], records[-1][1] + line)
    return records


@pytest.fixture(scope="module")
def bpe_ids() -> Path:
    r = run(["cargo", "build", "--quiet", "-p", "virnuc-data", "--example", "bpe_ids"], cwd=ROOT)
    assert r.returncode == 0, f"cargo build failed:\n{r.stderr}"
    return ROOT / "target" / "debug" / "examples" / "bpe_ids"


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE tokenizer in DNABERT-S's shape, trained on lambda (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=list("ACGT"),
        show_progress=False,
    )
    genome = read_fasta(FIXTURES / "lambda_virus.fa")[0][1]
    tok.train_from_iterator([genome[i : i + 500] for i in range(0, len(genome), 500)], trainer)
    tok.post_processor = processors.TemplateProcessing(  # type: ignore[assignment]
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.enable_truncation(max_length=2000)
    tok.enable_padding(length=2000, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(out))
    return out


def dna_spans(binary: Path, fasta: Path, compat: bool, tmp: Path) -> list[str]:
    out = tmp / f"{fasta.name}.{compat}.fna"
    cmd: list[str | Path] = [binary, "translate", fasta, "--chunk", "500", "--dna", "-o", out]
    if compat:
        cmd.append("--virnucpro-compat")
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    return [s for _, s in read_fasta(out)]


def edge_cases() -> list[str]:
    lam = read_fasta(FIXTURES / "lambda_virus.fa")[0][1]
    return [
        "",
        "A",
        "N" * 50,
        "ACGT" + "N" * 1000 + "ACGT",
        "RYKMSWBDHVN",
        "ACGTRYACGTKMACGTSWAC",
        "acgtacgtacgt",
        "ACGTacgtACGT",
        "ACG-TTA*GC.AT",
        "ACGU" * 30,
        lam,  # ~10k tokens: past the file's truncation at 2000
        lam.lower()[:3000],
    ]


def rust_ids(bpe_ids: Path, tokenizer: Path, seqs: list[str]) -> list[list[int]]:
    r = run([bpe_ids, tokenizer], input="".join(s + "\n" for s in seqs))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")[: len(seqs)]
    return [[int(x) for x in line.split()] for line in lines]


def python_ids(tokenizer: Path, seqs: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tokenizer))
    raw.no_truncation()
    raw.no_padding()
    # VirNucPro: AutoTokenizer.from_pretrained(...) then tokenizer(seq); the folder's config makes it
    # a PreTrainedTokenizerFast over the same file.
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer),
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    return [raw.encode(s).ids for s in seqs], [list(hf(s)["input_ids"]) for s in seqs]


def inputs(binary: Path, tmp: Path, klebsiella_spans: bool) -> dict[str, list[str]]:
    klebsiella = FIXTURES / "klebsiella_HS11286.fna.gz"
    out = {
        "edge cases": edge_cases(),
        "lambda spans (VirNucPro)": dna_spans(binary, FIXTURES / "lambda_virus.fa", True, tmp),
        "lambda spans (coded)": dna_spans(binary, FIXTURES / "lambda_virus.fa", False, tmp),
        "synthetic spans (VirNucPro)": dna_spans(binary, FIXTURES / "virnucpro_synthetic.fa", True, tmp),
    }
    if klebsiella.is_file():
        if klebsiella_spans:
            out["Klebsiella spans (VirNucPro)"] = dna_spans(binary, klebsiella, True, tmp)
        out["Klebsiella 50 kb"] = [read_fasta(klebsiella)[0][1][:50_000]]
    return out


def check(bpe_ids: Path, tokenizer: Path, cases: dict[str, list[str]]) -> None:
    for what, seqs in cases.items():
        assert seqs, what
        ours = rust_ids(bpe_ids, tokenizer, seqs)
        raw, hf = python_ids(tokenizer, seqs)
        assert raw == hf, f"{what}: the two Python paths differ"
        for s, a, b in zip(seqs, ours, raw, strict=True):
            assert a == b, f"{what}: {s[:60]!r}... Rust {a[:20]} vs Python {b[:20]}"


def test_trained_tokenizer_ids_equal_python(
    binary: Path, bpe_ids: Path, trained_tokenizer: Path, tmp_path: Path
) -> None:
    cases = inputs(binary, tmp_path, klebsiella_spans=False)
    check(bpe_ids, trained_tokenizer, cases)
    # The long input really is past the file's truncation length, and lowercase is [UNK] (0).
    long_ids = rust_ids(bpe_ids, trained_tokenizer, [cases["edge cases"][10]])[0]
    assert len(long_ids) > 2000
    assert set(rust_ids(bpe_ids, trained_tokenizer, ["acgt"])[0][1:-1]) == {0}


@pytest.mark.skipif(
    not (REAL_TOKENIZER / "tokenizer.json").is_file(),
    reason=f"the DNABERT-S tokenizer is not in {REAL_TOKENIZER} (public data kept outside the repo)",
)
def test_real_dnabert_s_tokenizer_ids_equal_python(binary: Path, bpe_ids: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = REAL_TOKENIZER / "tokenizer.json"
    cases = inputs(binary, tmp_path, klebsiella_spans=True)
    check(bpe_ids, tokenizer, cases)
    # And the exact object VirNucPro builds from the folder.
    auto = AutoTokenizer.from_pretrained(str(REAL_TOKENIZER))
    seqs = cases["edge cases"] + cases["lambda spans (VirNucPro)"][:200]
    assert rust_ids(bpe_ids, tokenizer, seqs) == [list(auto(s)["input_ids"]) for s in seqs]
