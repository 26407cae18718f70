#!/usr/bin/env bash
# One device call: end to end, FASTA to HDF5, both attention flavors against the packed PyTorch peer
# (tools/bench/run.py bench), then each virnuc-trt output checked against a PyTorch fp32 reference of
# the same random weights (tools/gpu/embed_check.py, cosine >= 0.999).
#   bash tools/gpu/e2e_flavors.sh [TAG]     (after ../shared/device/stage-ort-gpu's runs; carry .device-stage/bench)
# Steady-state token counts: 1.2M per workload for 650M, 600k for 3B. Results under $OUT:
# <tag>-650M.{md,json,log}, <tag>-3B.*, checks.jsonl.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
tag="${1:-e2e}"
out="${OUT:-/tmp/e2e_flavors}"; mkdir -p "$out"
work="${TMPDIR:-/tmp}/bw"
# shellcheck disable=SC1091
source /opt/onnxruntime-gpu/env.sh
export PYTHONUNBUFFERED=1
status=0
for spec in esm2_t33_650M:1200000:650M esm2_t36_3B:600000:3B; do
  IFS=: read -r model tokens short <<<"$spec"
  python3 tools/bench/run.py bench --models "$model" --precisions fp16 --max-tokens "$tokens" \
    --peers virnuc-trt,torch-packed --virnuc-attention ort,virnuc --passes 2 --stage .device-stage/bench \
    --work "$work" --tag "$tag-$short" >"$out/$tag-$short.log" 2>&1 || status=1
  grep -E "^\| $model" "$out/$tag-$short.md" 2>/dev/null || tail -5 "$out/$tag-$short.log"
  for h5 in "$work"/out/"$model"/*/virnuc-trt-fp16-*.h5; do
    [[ -f $h5 ]] || continue
    workload="$(basename "$(dirname "$h5")")"
    fasta="$(ls "$work"/workloads/"$workload"-"$tokens"-s1.fa 2>/dev/null | head -1)"
    python3 tools/gpu/embed_check.py --h5 "$h5" --fasta "$fasta" --random "$model" --seed 1 --sample 32 \
      --json "$out/check.json" >>"$out/checks.log" 2>&1 || status=1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['file']=sys.argv[2]; print(json.dumps(d))" \
      "$out/check.json" "$h5" | tee -a "$out/checks.jsonl"
  done
done
exit $status
