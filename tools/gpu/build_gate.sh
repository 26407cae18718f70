#!/usr/bin/env bash
# `virnuc-trt build` + `virnuc-trt gate` on the GPU machine (issue #5): per model, an fp32 export, an
# fp32 reference engine, an fp16 engine re-exported by `build` from the fp32 export with the token-budget
# autotune and CUDA graphs measured on/off, then the fp16-vs-fp32 gate.
#
#   tools/gpu/build_gate.sh BIN [--models "esm2_t33_650M esm2_t36_3B"] [--steps "export build gate"]
#                           [--flavor ort] [--budgets 4096,8192,16384,32768,65536] [--seconds 3]
#                           [--cuda-graph measure] [--sample 256] [--data DIR] [--work DIR]
#
# BIN is the release binary (e.g. .device-stage/bin/virnuc-trt, carried in an ignored folder).
# Steps, runnable in parts (exports and engines persist in --work on a warm machine; a 3B model may
# need one call per step to stay under the 10-minute limit):
#   export  random-weight fp32 export (seed 0, --flavor) with the device's python and export/
#   build   fp32 engine (fixed budget 16384, the gate's reference) and fp16 engine (--precision fp16:
#           re-exported by build; autotune over --budgets, CUDA graph on/off per --cuda-graph)
#   gate    fp16 engine vs fp32 engine on lambda_virus.fa (nucleotide mode, --sample sequences)
# Expects: /opt/onnxruntime-gpu/env.sh sourced (ORT_DYLIB_PATH), nvidia-smi, python with numpy,
# onnx, pyyaml (the exporter's needs). Results under $OUT (else out/gpu-build-gate/): build_gate.log
# (build output with the autotune tables, gate text reports), <model>.fp16.manifest.json,
# <model>.fp32.manifest.json, <model>.gate.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if [[ $# -lt 1 || "$1" == -* ]]; then
  sed -n '2,20p' "${BASH_SOURCE[0]}"
  exit 2
fi
bin="$(realpath "$1")"
shift
models="esm2_t33_650M esm2_t36_3B"
steps="export build gate"
flavor=ort
budgets=4096,8192,16384,32768,65536
seconds=3
cuda_graph=measure
sample=256
data="$root/.device-stage/data"
work="${TMPDIR:-/tmp}/virnuc-build-gate"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --flavor) flavor="$2"; shift 2 ;;
    --budgets) budgets="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --cuda-graph) cuda_graph="$2"; shift 2 ;;
    --sample) sample="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build_gate: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -x "$bin" ]] || { echo "build_gate: $bin is not an executable (build with cargo build --release)" >&2; exit 2; }
[[ -n "${ORT_DYLIB_PATH:-}" ]] || { echo "build_gate: source /opt/onnxruntime-gpu/env.sh first" >&2; exit 2; }
results="${OUT:-$root/out/gpu-build-gate}"
mkdir -p "$results" "$work"
log="$results/build_gate.log"
say() { printf '%s\n' "$*" | tee -a "$log" >&2; }
has() { [[ " $steps " == *" $1 "* ]]; }
export PYTHONPATH="$root/export${PYTHONPATH:+:$PYTHONPATH}" VIRNUC_ROOT="$root"

say "== build_gate $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n1)"
for model in $models; do
  fp32="$work/$model.fp32"
  e32="$work/$model.engine.fp32"
  e16="$work/$model.engine.fp16"
  if has export; then
    say "-- export $model fp32 ($flavor)"
    /usr/bin/time -f "export %e s, peak RSS %M KB" python3 -m virnuc_export --random "$model" --seed 0 \
      --attention "$flavor" --precision fp32 --out "$fp32" 2>&1 | tee -a "$log"
  fi
  if has build; then
    say "-- build $model fp32 reference engine"
    "$bin" build --model "$fp32" --ep cuda --out "$e32" --overwrite --budget 16384 2>&1 | tee -a "$log"
    cp "$e32/manifest.json" "$results/$model.fp32.manifest.json"
    say "-- build $model fp16 engine (re-export, autotune $budgets, CUDA graph $cuda_graph)"
    "$bin" build --model "$fp32" --precision fp16 --ep cuda --out "$e16" --overwrite \
      --budgets "$budgets" --autotune-seconds "$seconds" --cuda-graph "$cuda_graph" 2>&1 | tee -a "$log"
    cp "$e16/manifest.json" "$results/$model.fp16.manifest.json"
  fi
  if has gate; then
    say "-- gate $model fp16 vs fp32"
    set +e
    "$bin" gate --candidate "$e16" --reference "$e32" --input "$data/lambda_virus.fa" \
      --mode nucleotide --sample "$sample" --json "$results/$model.gate.json" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    set -e
    say "gate exit status for $model: $status (0 pass, 1 fail)"
  fi
done
