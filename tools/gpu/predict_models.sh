#!/usr/bin/env bash
# The three random-weight models `predict` needs, for the GPU benchmarks (predict_bench.sh,
# scale_bench.sh): ESM-2 ESM_DIR and DNABERT-S DNA_DIR of one flavor and precision, and a classifier
# CLF_DIR for 768 + H features (H: the ESM-2 model's width). Seed 0; a model already there is kept.
#
#   tools/gpu/predict_models.sh ESM_NAME FLAVOR PRECISION ESM_DIR DNA_DIR CLF_DIR [DNABERT_LAYERS]
#
# Run from anywhere with the device's python (torch, onnx, tokenizers); progress on stderr.
set -euo pipefail
[[ $# -ge 6 ]] || { sed -n '2,7p' "${BASH_SOURCE[0]}" >&2; exit 2; }
esm="$1" flavor="$2" precision="$3"
# Absolute: the exporter runs from export/.
esm_dir="$(realpath -m "$4")" dna_dir="$(realpath -m "$5")" clf_dir="$(realpath -m "$6")"
layers=(); [[ -n "${7:-}" ]] && layers=(--layers "$7")
cd "$(dirname "${BASH_SOURCE[0]}")/../../export"
if [[ ! -f "$esm_dir/model.json" ]]; then
  echo "== export $esm ($flavor, $precision, random weights) -> $esm_dir" >&2
  python3 -m virnuc_export --random "$esm" --seed 0 --attention "$flavor" --precision "$precision" \
    --out "$esm_dir" >&2
fi
if [[ ! -f "$dna_dir/model.json" ]]; then
  echo "== export dnabert_s ($flavor, $precision, random weights) -> $dna_dir" >&2
  python3 -m virnuc_export --random dnabert_s --seed 0 "${layers[@]}" --attention "$flavor" \
    --precision "$precision" --out "$dna_dir" >&2
fi
if [[ ! -f "$clf_dir/classifier.json" ]]; then
  esm_dim=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['model']['hidden_size'])" \
    "$esm_dir/model.json")
  python3 -m virnuc_export --random-classifier --esm-dim "$esm_dim" --seed 0 --out "$clf_dir" >&2
fi
