#!/usr/bin/env python3
"""Trains the project's small DNABERT-S-format BPE test tokenizer (see export/virnuc_export/dna_tokenizer.py).

    python tools/train_test_tokenizer.py --out TOKENIZER.json [--fasta FILE ...] [--vocab-size N]
        [--no-truncation-padding]

Deterministic: the same inputs give a byte-identical file. Needs the `tokenizers` package (in the venv).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from virnuc_export.dna_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
