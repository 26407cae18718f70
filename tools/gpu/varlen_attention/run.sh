#!/usr/bin/env bash
# One device call: correctness, negative control, compute-sanitizer, speed. Results under $OUT.
# Every step covers both kernel families of contract version 2: rotary/no positions and ALiBi
# (check: ALiBi cases with DNABERT-S's 12 slopes up to 2600 tokens; control: ALiBi dropped, slopes
# reversed, query offset from the pack start must fail; sanitize/racecheck: the quick set includes
# an ALiBi pack; rust: runtime/cuda/tests/gpu.rs's ALiBi test; bench: an ours_alibi time).
# Run from the project root on the GPU machine, carrying build/varlen_attention (the fatbin built
# here by plugins/varlen_attention/build.sh):
#   bash tools/gpu/varlen_attention/run.sh [check|control|sanitize|racecheck|bench]...   (default: all)
# and, for another fatbin carried as build/varlen_<tag>/: check-<tag>, control-<tag>, bench-<tag>.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out="${OUT:-/tmp/varlen_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=tools/gpu/varlen_attention/varlen_gpu.py
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(check control sanitize bench)
status=0
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } | tee "$out/device.txt"
sanitize() {
  local tool="$1" log="$out/${2:-$1}.txt"
  # Check only our kernels (torch's own are not under test); fall back to the older flag name.
  compute-sanitizer --tool "$tool" --error-exitcode 9 --kernel-name kns=virnuc_varlen \
    python3 "$py" check --quick >"$log" 2>&1
  local rc=$?
  if grep -q "unrecognized\|Unknown option\|invalid option" "$log"; then
    compute-sanitizer --tool "$tool" --error-exitcode 9 --filter kns=virnuc_varlen \
      python3 "$py" check --quick >"$log" 2>&1
    rc=$?
  fi
  tail -n 4 "$log"
  echo "$tool exit code: $rc"
  return $rc
}
for s in "${steps[@]}"; do
  echo "== $s"
  case "$s" in
    check) python3 "$py" check --out "$out/check.json" 2>&1 | tee "$out/check.txt" || status=1 ;;
    control) python3 "$py" control 2>&1 | tee "$out/control.txt" || status=1 ;;
    sanitize) sanitize memcheck || status=1 ;;
    racecheck) sanitize racecheck || status=1 ;;
    # The Rust loader (runtime/cuda) on this GPU: its ignored GPU tests, built on the dev machine
    # with `cargo test --release -p virnuc-cuda --no-run` and carried as build/varlen_rust/gpu_test.
    rust) VARLEN_KERNEL_DIR=build/varlen_attention build/varlen_rust/gpu_test --ignored --nocapture \
        --test-threads 1 2>&1 | tee "$out/rust.txt" || status=1 ;;
    bench) python3 "$py" bench --out "$out/bench.json" 2>&1 | tee "$out/bench.txt" || status=1 ;;
    # Every ESM-2 size's attention shape, fp16 and bf16 (chunk500).
    sizes) python3 "$py" bench-sizes --out "$out/sizes.json" 2>&1 | tee "$out/sizes.txt" || status=1 ;;
    # An earlier kernel version, carried as build/varlen_<tag>/varlen_attention.fatbin, timed in
    # the same call for a same-card comparison (VARLEN_GEOMETRY=<tag> names its launch geometry:
    # v1 and v3 are known to varlen_gpu.py's geometry(), any other tag gets the current one).
    # Correctness of such a fatbin, same cases.
    check-*) tag="${s#check-}"
      VARLEN_FATBIN="build/varlen_$tag/varlen_attention.fatbin" VARLEN_GEOMETRY="$tag" \
        python3 "$py" check --out "$out/check_$tag.json" 2>&1 | tee "$out/check_$tag.txt" || status=1 ;;
    control-*) tag="${s#control-}"
      VARLEN_FATBIN="build/varlen_$tag/varlen_attention.fatbin" VARLEN_GEOMETRY="$tag" \
        python3 "$py" control 2>&1 | tee "$out/control_$tag.txt" || status=1 ;;
    memcheck-*) tag="${s#memcheck-}"
      VARLEN_FATBIN="build/varlen_$tag/varlen_attention.fatbin" VARLEN_GEOMETRY="$tag" \
        sanitize memcheck "memcheck_$tag" || status=1 ;;
    bench-*) tag="${s#bench-}"
      VARLEN_FATBIN="build/varlen_$tag/varlen_attention.fatbin" VARLEN_GEOMETRY="$tag" \
        python3 "$py" bench --out "$out/bench_$tag.json" 2>&1 | tee "$out/bench_$tag.txt" || status=1 ;;
    *) echo "unknown step $s"; status=1 ;;
  esac
done
exit $status
