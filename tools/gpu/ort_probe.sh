#!/usr/bin/env bash
# One device call: where the exporter's `ort` flavor spends its GPU time under ONNX Runtime's CUDA EP,
# and ORT's PackedMultiHeadAttention alone against our kernel and torch flash (issue 6).
# From the project root on the GPU machine, after ../shared/device/stage-ort-gpu's runs, carrying
# build/varlen_attention (the fatbin): bash tools/gpu/ort_probe.sh [MODEL]   (default esm2_t33_650M)
# Results under $OUT: profile_*.json/.log (tools/gpu/ort_graph_profile.py), attention.json/.log
# (tools/gpu/ort_attention_bench.py), export logs, device.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
model="${1:-esm2_t33_650M}"
out="${OUT:-/tmp/ort_probe}"
work="${TMPDIR:-/tmp}/ort_probe_work"
mkdir -p "$out" "$work"
# shellcheck disable=SC1091
source /opt/onnxruntime-gpu/env.sh
export PYTHONUNBUFFERED=1
status=0
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } | tee "$out/device.txt"
for variant in fused unfused; do
  flag=--fused; [[ $variant == unfused ]] && flag=--no-fused
  dir="$work/${model}_ort_$variant"
  [[ -f $dir/model.onnx ]] || (cd export && python3 -m virnuc_export --random "$model" --seed 0 --attention ort \
    $flag --precision fp16 --out "$dir") >"$out/export_$variant.log" 2>&1 || { echo "export $variant failed"; status=1; }
done
for mix in chunk500 broad; do
  python3 tools/gpu/ort_graph_profile.py "$work/${model}_ort_fused" "$work/${model}_ort_unfused" --mix "$mix" \
    --sdpa default,flash,efficient --out "$out/profile_$mix.json" >"$out/profile_$mix.log" 2>&1 || status=1
  grep -E '"(model|sdpa_kernel|tokens_per_s|gpu_busy|error)"' "$out/profile_$mix.log"
done
python3 tools/gpu/ort_attention_bench.py --out "$out/attention.json" 2>&1 | tee "$out/attention.log" | tail -8 || status=1
exit $status
