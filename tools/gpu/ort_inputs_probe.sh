#!/usr/bin/env bash
# One device call: does where the runtime places its inputs (pinned host vs device memory) explain the
# `ort` flavor's end-to-end gap to the same graph run from Python with inputs on the device?
#   bash tools/gpu/ort_inputs_probe.sh BIN [MODEL]        (after the ORT GPU staging runs)
# Runs `virnuc-trt embed` on the chunk500 and broad workloads (tools/gpu/embed_bench.sh) for the `ort`
# flavor with VIRNUC_INPUTS_ON_DEVICE=0 and =1, and the `virnuc` flavor as control. Results under $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin="$1"; model="${2:-esm2_t33_650M}"
out="${OUT:-/tmp/ort_inputs_probe}"; mkdir -p "$out"
# shellcheck disable=SC1091
source /opt/onnxruntime-gpu/env.sh
data=.device-stage/bench/data
work="${TMPDIR:-/tmp}/eb"
which nsys ncu 2>&1 | tee "$out/tools.txt"
for run in ort:0 ort:1 virnuc:0; do
  flavor="${run%:*}"; on_dev="${run#*:}"
  VIRNUC_INPUTS_ON_DEVICE=$on_dev OUT="$out/${flavor}_inputs_on_device_$on_dev" \
    bash tools/gpu/embed_bench.sh --models "$model" --flavor "$flavor" --bin "$bin" --data "$data" \
    --work "$work" --steps "export embed" 2>&1 | grep -E "tokens/s|error|Error" | tail -4
done
