#!/usr/bin/env bash
# The single-GPU measurements (issue 14) in stages, each bounded so that the stages of one device
# call fit its 600 s, made back to back after the five ONNX Runtime GPU staging runs (README.md here):
#
#   bash tools/gpu/h200_visit.sh kernels models   carry build/varlen_attention build/varlen_rust
#                                                        .device-stage/bench
#   bash tools/gpu/h200_visit.sh esm              carry .device-stage/bench
#
# kernels  the VarlenAttention kernel on the card: float64 check (rotary, none and ALiBi modes),
#          negative controls, compute-sanitizer memcheck, the Rust loader's GPU tests
#          (runtime/cuda/tests/gpu.rs, built here with `cargo test --release -p virnuc-cuda --no-run`
#          and copied to build/varlen_rust/gpu_test), the attention bench (~70 s).
# sizes    run.sh's `sizes` step: every ESM-2 size's attention shape, fp16 and bf16 (~240 s).
# models   DNABERT-S packed fp16 (`ort` flavor: embed, the padded SDPA peer at batch 64 and 256, the
#          fp32 check; `virnuc` flavor: embed and the check of its HDF5), then predict_bench.sh
#          (predict 3B + DNABERT-S against embed 3B alone, `virnuc` flavor) (~250 s).
# esm      tools/bench/run.py bench on ESM-2 3B fp16, chunk500 and broad, 600k tokens, both attention
#          flavors, the torch packed + flash and HF SDPA peers: the figure of this commit (~260 s).
#
# Stage with: cargo build --release -p virnuc-trt && python3 tools/bench/run.py prepare, the fatbin
# copied to .device-stage/bench/bin/varlen_attention/, plugins/varlen_attention/build.sh.
# Results: $OUT/h200_visit.log, $OUT/<stage>.tar.gz (everything a stage wrote), its *.jsonl and *.md.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[[ $# -gt 0 ]] || { echo "usage: h200_visit.sh STAGE... (kernels|sizes|models|esm)" >&2; exit 2; }
res="${OUT:-/tmp/h200_visit}"
work_root="${TMPDIR:-/tmp}/h200_visit"
mkdir -p "$res" "$work_root" /tmp/h200_visit/shim
export PYTHONUNBUFFERED=1
# Some scripts call `python`; the machine's image names its interpreter python3 only.
ln -sf "$(command -v python3)" /tmp/h200_visit/shim/python
export PATH="/tmp/h200_visit/shim:$PATH"
log="$res/h200_visit.log"
{
  echo "== h200_visit $* $(date -u +%FT%TZ) commit $(cat .device-stage/bench/commit.txt 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
} | tee "$log"
if [[ -f /opt/onnxruntime-gpu/env.sh ]]; then
  # shellcheck disable=SC1091
  source /opt/onnxruntime-gpu/env.sh
else
  echo "no ONNX Runtime GPU staged (/opt/onnxruntime-gpu/env.sh): ORT steps will fail" | tee -a "$log"
fi
bin=.device-stage/bench/bin/virnuc-trt
data=.device-stage/bench/data
t0=$SECONDS
step() {
  local limit="$1"
  shift
  echo "== [$((SECONDS - t0)) s] $* (at most $limit s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "   exit ${PIPESTATUS[0]}" | tee -a "$log"
}
run_stage() {
  local stage="$1" work="$2"
  case "$stage" in
    kernels)
      OUT="$work/varlen" step 280 bash tools/gpu/varlen_attention/run.sh check control sanitize rust bench
      ;;
    sizes)
      OUT="$work/varlen" step 240 bash tools/gpu/varlen_attention/run.sh sizes
      ;;
    models)
      OUT="$work" step 200 bash tools/gpu/dnabert_bench.sh --bin "$bin" --data "$data" --work /tmp/dnabert
      # The peer at a larger batch (the padding is small: the frames' spans are of similar lengths).
      OUT="$work" step 60 bash tools/gpu/dnabert_bench.sh --bin "$bin" --data "$data" --work /tmp/dnabert \
        --steps peer --batch 256
      OUT="$work" step 90 bash tools/gpu/dnabert_bench.sh --bin "$bin" --data "$data" --work /tmp/dnabert \
        --flavor virnuc --steps "export embed check"
      OUT="$work" step 280 bash tools/gpu/predict_bench.sh --bin "$bin" --data "$data" --passes 2 \
        --flavor virnuc
      ;;
    esm)
      step 540 python3 tools/bench/run.py bench --models esm2_t36_3B --precisions fp16 --passes 2 \
        --max-tokens 600000 --virnuc-attention ort,virnuc --peers virnuc-trt,torch-packed,hf-sdpa \
        --virnuc-trt "$bin" --work /tmp/bench --results "$work" --tag e2e-3B
      ;;
    *) echo "h200_visit: unknown stage $stage (kernels|sizes|models|esm)" >&2; return 2 ;;
  esac
}
for stage in "$@"; do
  work="$work_root/$stage"
  mkdir -p "$work"
  run_stage "$stage" "$work" || exit 2
  tar -czf "$res/$stage.tar.gz" -C "$work" . 2>/dev/null
  cp "$work"/*.jsonl "$work"/*.md "$res/" 2>/dev/null
  echo "== h200_visit $stage done after $((SECONDS - t0)) s" | tee -a "$log"
done
