#!/usr/bin/env bash
# Builds the VarlenAttention CUDA kernel into build/varlen_attention/ (ignored, never committed):
#   varlen_attention.fatbin   30 kernels (rotary/none and ALiBi x 3 dtypes x 5 head dims): sm_80 +
#                             sm_90 machine code and compute_80 PTX (JIT for newer GPUs);
#                             what runtime/cuda loads with cuModuleLoadData
#   resources.txt             ptxas register / shared-memory / spill report per kernel
# and checks itself: warnings are errors, every kernel the loaders look up is in the fatbin, the
# C++ host launcher (TensorRT plugin path) compiles, and the host-side validation test passes.
#
# Compiler: $NVCC if set, else the PyPI CUDA 13.0 nvcc in .venv (requirements.txt), else
# /usr/local/cuda/bin/nvcc. No GPU needed. Skips the compile when the sources have not changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
src="$root/plugins/varlen_attention"
out="$root/build/varlen_attention"
[[ $# -eq 0 ]] || { echo "usage: build.sh" >&2; exit 2; }
mkdir -p "$out"

die() { echo "varlen_attention/build.sh: $*" >&2; exit 1; }

nvcc="${NVCC:-}"
inc=()
if [[ -z "$nvcc" ]]; then
  for cu13 in "$root"/.venv/lib/python3*/site-packages/nvidia/cu13; do
    if [[ -x "$cu13/bin/nvcc" ]]; then
      nvcc="$cu13/bin/nvcc"
      inc=(-I"$cu13/include" -I"$cu13/include/cccl")
    fi
  done
fi
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
[[ -n "$nvcc" ]] || die "no nvcc: run 'bash tools/setup.sh' (installs the pinned PyPI CUDA 13.0 compiler) or set NVCC"
"$nvcc" --version | grep -q "release 13\." || die "$nvcc is not CUDA 13.x: $("$nvcc" --version | tail -n1)"

kernels=()
for mode in "" alibi_; do  # rotary/none, and ALiBi (contract version 2)
  for dt in f32 f16 bf16; do
    for d in 16 24 32 64 128; do kernels+=("virnuc_varlen_attention_${mode}${dt}_d${d}"); done
  done
done

stamp="$out/sources.sha256"
want="$(cat "$src/varlen_attention.cu" "$src/varlen_attention_launch.h" "$src/attributes.h" "$src/tests/validate_test.cpp" \
  "$src"/tensorrt/* "$0" | sha256sum | cut -d' ' -f1)${TENSORRT_INCLUDE_DIR:+-trt}"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$out/varlen_attention.fatbin" ]]; then
  echo "varlen_attention: up to date ($out/varlen_attention.fatbin)" >&2
  exit 0
fi
rm -f "$stamp"

flags=(-std=c++17 -O3 -Werror all-warnings "${inc[@]}")
echo "varlen_attention: compiling sm_80, sm_90 + compute_80 PTX with $nvcc" >&2
"$nvcc" "${flags[@]}" --threads 0 -Xptxas -v \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_80,code=compute_80 \
  -fatbin -o "$out/varlen_attention.fatbin.tmp" "$src/varlen_attention.cu" 2>"$out/resources.txt" \
  || { cat "$out/resources.txt" >&2; die "kernel compile failed"; }

# Every entry point the loaders look up must be there (names are stored as plain strings).
for k in "${kernels[@]}"; do
  grep -aq "$k" "$out/varlen_attention.fatbin.tmp" || die "kernel $k missing from the fatbin"
done
# Large register spills in the sm_90 f16 kernels (the production path) would cost the speed the
# kernel exists for; a few bytes under the 128-register cap (two blocks an SM) are accepted.
spills="$(awk '/Compiling entry function/ { entry = $0 }
  /bytes spill stores/ && $5 + 0 > 64 && entry ~ /_f16_/ && entry ~ /sm_90/ { print entry }' "$out/resources.txt")"
[[ -z "$spills" ]] || die "register spills in: $spills (see $out/resources.txt)"
mv "$out/varlen_attention.fatbin.tmp" "$out/varlen_attention.fatbin"

# The C++ host launcher (linked into the TensorRT plugin) must compile too.
"$nvcc" "${flags[@]}" -DVIRNUC_VARLEN_ATTENTION_HOST_LAUNCHER -I"$src" \
  -gencode arch=compute_90,code=sm_90 -c -o "$out/varlen_attention_launcher.o" "$src/varlen_attention.cu" \
  || die "host launcher compile failed"

# Host-side validation (shapes, attributes, grid and the geometry table) with plain g++: no CUDA,
# no TensorRT.
"${CXX:-g++}" -std=c++17 -Wall -Wextra -Werror -I"$src" -o "$out/validate_test" "$src/tests/validate_test.cpp" \
  || die "validate_test compile failed"
"$out/validate_test" || die "validate_test failed"

# The TensorRT plugin against real TensorRT headers, when some are at hand ($TENSORRT_INCLUDE_DIR:
# a TensorRT install's include/ or the NVIDIA/TensorRT repository's): compiled, not linked.
if [[ -n "${TENSORRT_INCLUDE_DIR:-}" ]]; then
  cuda_inc="$(dirname "$(dirname "$nvcc")")/include"
  for def in -DVIRNUC_TRT_STATIC_REGISTRATION -UVIRNUC_TRT_STATIC_REGISTRATION; do
    "${CXX:-g++}" -std=c++17 -Wall -Wextra -Werror -fsyntax-only "$def" -isystem "$TENSORRT_INCLUDE_DIR" \
      -isystem "$cuda_inc" -I"$src" "$src/tensorrt/varlen_attention_plugin.cpp" \
      || die "TensorRT plugin does not compile against $TENSORRT_INCLUDE_DIR"
  done
  echo "varlen_attention: TensorRT plugin compiles against $TENSORRT_INCLUDE_DIR" >&2
fi

echo "$want" >"$stamp"
echo "varlen_attention: built $out/varlen_attention.fatbin ($(stat -c %s "$out/varlen_attention.fatbin") bytes, ${#kernels[@]} kernels)" >&2
