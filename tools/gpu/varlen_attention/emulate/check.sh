#!/usr/bin/env bash
# Runs the kernel source on the CPU (no GPU): emu_shim.h emulates the CUDA features it uses;
# emu_main.cpp compares f16 head_dim 64, 128 and 32 (and bf16/fp32 at 64) against float64, with the
# launch geometry of varlen_attention_launch.h. `check.sh [--quick]`. Runs twice: cp.async copies
# landing as late (at the wait) and as early (at the commit) as the hardware allows.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../../.." && pwd)"
src="$root/plugins/varlen_attention"
kernel="${VARLEN_SRC:-$src/varlen_attention.cu}"  # a mutated copy, to see the check fail
args=("$@")
inc=()
for cu13 in "$root"/.venv/lib/python3*/site-packages/nvidia/cu13; do inc=(-I"$cu13/include"); done
bin="$(mktemp -d)/emu"
"${CXX:-g++}" -std=c++20 -O2 -w -DVIRNUC_VARLEN_EMULATE "${inc[@]}" -I"$src" -I"$here" \
  -include "$here/emu_shim.h" -x c++ "$kernel" -x none "$here/emu_main.cpp" -o "$bin"
echo "== cp.async landing at the wait (lazy)"
"$bin" "${args[@]}"
echo "== cp.async landing at the commit (eager)"
EMU_CP_ASYNC=eager "$bin" "${args[@]}"
