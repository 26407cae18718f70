#!/usr/bin/env bash
# One device call for issue 6: the v4 kernel against the current one (compare_v4.sh --quick: v4's
# float64 check and negative control, interleaved benches vs torch flash), v4's compute-sanitizer
# memcheck, then ORT's PackedMultiHeadAttention attention-only at the same shapes
# (ort_attention_bench.py, kernel times from CUPTI) with what time is left. Everything lands in $OUT/kernel_final.tar.gz
# (the device returns at most 8 files), summary.txt and attention.log beside it.
#   bash tools/gpu/kernel_final.sh [SECONDS]   (after the ORT GPU staging runs; carry build/varlen_attention
#                                               and build/varlen_v4; SECONDS bounds the whole call, default 300)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
limit="${1:-300}"
res="${OUT:-/tmp/kernel_final}"
work="${TMPDIR:-/tmp}/kernel_final_work"
mkdir -p "$res" "$work"
pack() {
  cp "$work/summary.txt" "$work/attention.log" "$res/" 2>/dev/null
  tar -czf "$res/kernel_final.tar.gz" -C "$work" . 2>/dev/null
}
trap pack EXIT
t0=$SECONDS
left() { local l=$((limit - (SECONDS - t0))); echo $((l > 1 ? l : 1)); }
OUT="$work" timeout "$(left)" bash tools/gpu/varlen_attention/compare_v4.sh --quick 2>&1 | tee "$work/compare_v4.log" | tail -30
echo "== memcheck of v4 with $(left) s left"
OUT="$work" timeout "$(left)" bash tools/gpu/varlen_attention/run.sh memcheck-v4 2>&1 | tail -6
if [[ -f /opt/onnxruntime-gpu/env.sh ]]; then
  # shellcheck disable=SC1091
  source /opt/onnxruntime-gpu/env.sh
  VARLEN_FATBIN=build/varlen_v4/varlen_attention.fatbin VARLEN_GEOMETRY=v4 timeout "$(left)" \
    python3 tools/gpu/ort_attention_bench.py --out "$work/attention.json" >"$work/attention.log" 2>&1
  tail -n 8 "$work/attention.log"
else
  echo "no ONNX Runtime GPU staged: ORT attention bench skipped"
fi
echo "kernel_final: done after $((SECONDS - t0)) s"
