#!/usr/bin/env bash
# Every test of the project, lints included. CI runs exactly this (`.ci/run`).
# Set-up is automatic: tools/setup.sh installs the pinned Python environment on first use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# /dev/null must be the null device. On a machine where it is a regular file (seen on this project's
# CI runner), whatever programs discard piles up in it, and rustc, which cargo starts with
# stdin=/dev/null to probe the target, reads that text back as source: "error: unknown start of
# token" before any test runs. Recreate the device when we may; otherwise empty the file before
# each cargo command so the probe at least reads nothing.
null_device_ok() { [ -c /dev/null ]; }
if ! null_device_ok; then
  echo "test.sh: /dev/null is a $(stat -c %F /dev/null), not the null device" >&2
  if mknod -m 666 /dev/null.virnuc c 1 3 2>/dev/null && mv -f /dev/null.virnuc /dev/null; then
    echo "test.sh: recreated /dev/null as the null device" >&2
  else
    echo "test.sh: cannot recreate it here; emptying it before each cargo command" >&2
  fi
fi
empty_null() { null_device_ok || : >/dev/null; }

# Disk first: a fresh set-up needs ~10 GB (README), and a full disk otherwise shows up as some
# unrelated-looking pip or linker error.
echo "test.sh: $(df -Ph . | awk 'NR==2 {print $4 " free on " $6}')" >&2

# shellcheck disable=SC1091
source tools/setup.sh

step() { printf '\n== %s\n' "$*" >&2; }

step "lint: rustfmt, clippy, ruff"
empty_null
cargo fmt --all --check
empty_null
cargo clippy --workspace --all-targets --locked -- -D warnings
ruff check .
ruff format --check .

step "CUDA kernel: compile for sm_80/sm_90 with warnings as errors (no GPU needed)"
bash plugins/varlen_attention/build.sh

step "CUDA kernel source run on the CPU emulator against float64 (rotary and ALiBi kernels)"
bash tools/gpu/varlen_attention/emulate/check.sh --quick

step "rust tests"
empty_null
cargo test --workspace --locked

step "python tests (exporter against HF transformers and fair-esm)"
pytest
