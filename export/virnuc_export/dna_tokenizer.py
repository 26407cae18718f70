"""A small BPE tokenizer in DNABERT-S's format, trained with Hugging Face `tokenizers` on the committed
fixture genomes, so that the tests (Python and Rust) need no `../shared` and no model hub.

The format is the released DNABERT-S `tokenizer.json`'s (zhihan1996/DNABERT-S, the DNABERT-2
vocabulary): BPE with `[UNK]`=0 `[CLS]`=1 `[SEP]`=2 `[PAD]`=3 `[MASK]`=4, then `A`=5 `C`=6 `G`=7 `T`=8
and the merges; no normalizer (lowercase and every non-ACGT character are one `[UNK]` each); pre-tokenizer
`Whitespace`; post-processor `[CLS] $A [SEP]`. Like the released file it carries `truncation`
(max_length 2000) and `padding` (Fixed 2000), which VirNucPro's `tokenizer(seq)` call switches off — so
a runtime that forgets to switch them off fails its tests here too (`--no-truncation-padding` leaves
them out).

Training is deterministic: the corpus is each genome and its reverse complement cut into fixed 500-base
fragments (one "word" each), and the BPE trainer breaks ties by pair order.

    python tools/train_test_tokenizer.py --out TOKENIZER.json [--fasta FILE ...] [--vocab-size N]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import tempfile
from pathlib import Path

from .config import repo_root

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
BASES = ["A", "C", "G", "T"]
FRAGMENT = 500
RELEASE_MAX_LENGTH = 2000  # the released tokenizer.json's truncation and padding length
_COMPLEMENT = str.maketrans("ACGT", "TGCA")


def default_fastas() -> list[Path]:
    return [repo_root() / "tests" / "fixtures" / "lambda_virus.fa"]


def read_genomes(path: Path) -> list[str]:
    """Sequences of a FASTA file (.gz too), upper-cased, only A/C/G/T runs kept (others split them)."""
    opener = gzip.open if path.suffix == ".gz" else open
    seqs: list[str] = []
    chunks: list[str] = []
    with opener(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if chunks:
                    seqs.append("".join(chunks))
                chunks = []
            else:
                chunks.append(line.strip().upper())
    if chunks:
        seqs.append("".join(chunks))
    if not seqs:
        raise ValueError(f"{path}: no FASTA records")
    return seqs


def corpus(fastas: list[Path]) -> list[str]:
    """Fixed-length fragments of every genome and of its reverse complement, in file order."""
    words: list[str] = []
    for path in fastas:
        for seq in read_genomes(path):
            for strand in (seq, seq.translate(_COMPLEMENT)[::-1]):
                for run in "".join(c if c in "ACGT" else " " for c in strand).split():
                    words += [run[i : i + FRAGMENT] for i in range(0, len(run), FRAGMENT)]
    return words


def train(fastas: list[Path] | None = None, vocab_size: int = 4096, truncation_padding: bool = True) -> str:
    """The tokenizer as JSON text (what `tokenizer.json` holds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    if not len(SPECIALS) + len(BASES) <= vocab_size <= 1 << 20:
        raise ValueError(f"vocab_size {vocab_size} outside {len(SPECIALS) + len(BASES)}..{1 << 20}")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=BASES,
        limit_alphabet=len(BASES),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(fastas or default_fastas()), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    if truncation_padding:
        tok.enable_truncation(max_length=RELEASE_MAX_LENGTH)
        tok.enable_padding(length=RELEASE_MAX_LENGTH, pad_id=3, pad_token="[PAD]")
    vocab = tok.get_vocab()
    want = {t: i for i, t in enumerate(SPECIALS + BASES)}
    if any(vocab.get(t) != i for t, i in want.items()):
        raise AssertionError(f"special/base token ids differ from DNABERT-S's: {vocab}")
    return tok.to_str(pretty=True) + "\n"


def default_test_tokenizer() -> Path:
    """The default tokenizer of `--random dnabert_s` exports, trained on the committed lambda genome,
    written to a temporary file (training takes about a second)."""
    text = train()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"virnuc_test_tokenizer_{digest}.json"
    if not path.exists():
        tmp = path.with_suffix(f".{id(text)}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train_test_tokenizer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument(
        "--fasta", action="append", help="training genome(s), FASTA or .fa.gz (default: the lambda fixture)"
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096, DNABERT-S's)")
    p.add_argument(
        "--no-truncation-padding",
        action="store_true",
        help="leave out the released file's truncation/padding at 2000",
    )
    args = p.parse_args(argv)
    fastas = [Path(f) for f in args.fasta] if args.fasta else None
    try:
        text = train(fastas, args.vocab_size, not args.no_truncation_padding)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({len(text)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
