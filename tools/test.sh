#!/usr/bin/env bash
# Every test of the project, lints included. CI runs exactly this (`.ci/run`).
# Set-up is automatic: tools/setup.sh installs the pinned Python environment on first use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
source tools/setup.sh

step() { printf '\n== %s\n' "$*" >&2; }

step "lint: rustfmt, clippy, ruff"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
ruff check .
ruff format --check .

step "CUDA kernel: compile for sm_80/sm_90 with warnings as errors (no GPU needed)"
bash plugins/varlen_attention/build.sh

step "rust tests"
cargo test --workspace --locked

step "python tests (exporter against HF transformers and fair-esm)"
pytest
