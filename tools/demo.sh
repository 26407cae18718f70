#!/usr/bin/env bash
# The main job on the embedded default: ESM-2 embeddings of the lambda phage genome.
#
#   tools/demo.sh [extra `virnuc-trt embed` flags, e.g. --ep cuda]
#
# Sets up the environment (tools/setup.sh), builds the release binary, exports the demo model
# (esm2_t6_8M with RANDOM weights, seed 0, `virnuc` attention: runs on the CPU), and runs
# `virnuc-trt embed` on tests/fixtures/lambda_virus.fa in nucleotide mode (VirNucPro: 500 bp chunks,
# six frames, stop-free frames kept) into out/demo/lambda.h5, with the run report beside it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
source tools/setup.sh

demo=out/demo
model="$demo/model"
fasta=tests/fixtures/lambda_virus.fa
out="$demo/lambda.h5"
report="$demo/lambda.report.json"
mkdir -p "$demo"
if [[ ! -f "$fasta" ]]; then
  cp ../shared/data/lambda_virus.fa "$fasta"
fi

echo "== building virnuc-trt (release)" >&2
cargo build --release --locked -p virnuc-trt
bin=target/release/virnuc-trt

if [[ ! -f "$model/model.onnx" || ! -f "$model/model.json" ]]; then
  echo "== exporting the demo model: esm2_t6_8M, RANDOM weights (seed 0), virnuc attention" >&2
  (cd export && python -m virnuc_export --random esm2_t6_8M --seed 0 --attention virnuc \
    --out "../$model")
fi

# A fresh run each time: the demo output is replaced, never resumed.
rm -rf "$out" "$out.partial"
echo "== virnuc-trt embed $fasta" >&2
"$bin" embed "$fasta" --model "$model" --out "$out" --mode nucleotide --chunk 500 \
  --report "$report" "$@"

python - "$out" "$report" <<'PY'
import json, sys
import h5py
out, report = sys.argv[1], sys.argv[2]
r = json.load(open(report))
with h5py.File(out) as f:
    e = f["embeddings"]
    ids = f["sequence_ids"]
    first = ids[0].decode() if isinstance(ids[0], bytes) else ids[0]
    print(f"\nOutput: {out}")
    print(f"  embeddings {e.shape} {e.dtype}, first sequence {first}, {r['records']} record(s) read")
    print(f"  {r['tokens']} tokens in {r['packs']} packs on {r['ep']} "
          f"({r['tokens_per_s']:.0f} tokens/s); run report: {report}")
    print("  open it with: python -c \"import h5py; f = h5py.File('%s'); print(f['embeddings'][:])\"" % out)
print("\nNOTE: the demo model has RANDOM weights (esm2_t6_8M architecture, seed 0): the pipeline is")
print("real, the numbers are not ESM-2's. Export a real checkpoint with `python -m virnuc_export --hf DIR`.")
PY
