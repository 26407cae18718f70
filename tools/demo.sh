#!/usr/bin/env bash
# The main job on the embedded default: VirNucPro's viral prediction of the lambda phage genome.
#
#   tools/demo.sh [extra `virnuc-trt predict` flags, e.g. --ep cuda]
#
# Sets up the environment (tools/setup.sh), builds the release binary, exports the three demo models —
# ESM-2 esm2_t6_8M, DNABERT-S and VirNucPro's classifier (for 768 + 320 features), all with RANDOM
# weights (seed 0; `virnuc` attention: runs on the CPU) — and runs `virnuc-trt predict` on
# tests/fixtures/lambda_virus.fa (VirNucPro: 500 bp chunks, six frames, stop-free frames, each through
# DNABERT-S and ESM-2, then the classifier) into out/demo/predict/, then prints the per-record verdict.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
source tools/setup.sh

demo=out/demo
esm="$demo/esm2_t6_8M"
dnabert="$demo/dnabert_s"
classifier="$demo/classifier"
fasta=tests/fixtures/lambda_virus.fa
out="$demo/predict"
mkdir -p "$demo"
if [[ ! -f "$fasta" ]]; then
  cp ../shared/data/lambda_virus.fa "$fasta"
fi

echo "== building virnuc-trt (release)" >&2
cargo build --release --locked -p virnuc-trt
bin=target/release/virnuc-trt

if [[ ! -f "$esm/model.onnx" ]]; then
  echo "== exporting the demo ESM-2: esm2_t6_8M, RANDOM weights (seed 0), virnuc attention" >&2
  (cd export && python -m virnuc_export --random esm2_t6_8M --seed 0 --attention virnuc --out "../$esm")
fi
if [[ ! -f "$dnabert/model.onnx" ]]; then
  echo "== exporting the demo DNABERT-S: RANDOM weights (seed 0), the project's test tokenizer" >&2
  (cd export && python -m virnuc_export --random dnabert_s --seed 0 --attention virnuc --out "../$dnabert")
fi
if [[ ! -f "$classifier/classifier.json" ]]; then
  echo "== exporting the demo classifier: RANDOM weights (seed 1) for 768 + 320 features" >&2
  (cd export && python -m virnuc_export --random-classifier --esm-dim 320 --seed 1 --out "../$classifier")
fi

# A fresh run each time: the demo output is replaced, never resumed.
rm -rf "$out"
echo "== virnuc-trt predict $fasta" >&2
"$bin" predict "$fasta" --esm "$esm" --dnabert "$dnabert" --classifier "$classifier" --chunk 500 \
  --out-dir "$out" "$@"

python - "$out" <<'PY'
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = json.loads((out / "predict_report.json").read_text())
print(f"\nPer-record verdict ({out / 'prediction_verdicts.tsv'}):")
with (out / "prediction_verdicts.tsv").open(newline="") as f:
    for v in csv.DictReader(f, delimiter="\t"):
        print(f"  {v['record_id']}: {v['verdict']} — {v['length']} bp, {v['chunks']} chunks, "
              f"{v['frames']} stop-free frames, {v['viral_chunks']} viral chunks, "
              f"P(virus) max {v['max_p_virus']} mean {v['mean_p_virus']}")
print(f"\nVirNucPro's files: {out / 'prediction_results.txt'} ({r['frames']} frames), "
      f"{out / 'prediction_results_highestscore.csv'} ({r['chunks_virus']} chunks viral)")
for line in (out / "prediction_results.txt").read_text().splitlines()[:4]:
    print("  " + line)
print(f"  {r['frames']} frames in {r['predict_wall_s']:.1f} s on {r['ep']}; run report: {out / 'predict_report.json'}")
print("\nNOTE: all three demo models have RANDOM weights (seeded): the pipeline is real, the verdict is")
print("not. With VirNucPro's files, see README.md (Using it, 5.) for the real-checkpoint command.")
PY
