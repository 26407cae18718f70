#!/usr/bin/env bash
# DNABERT-S on the GPU (issue 14 item 3): packed fp16 throughput of `virnuc-trt embed` against a padded
# fp16 SDPA PyTorch peer (the Broad v2.0 path) in the same call, outputs checked against PyTorch fp32.
#
#   tools/gpu/dnabert_bench.sh [--steps "export embed peer check"] [--flavor ort|virnuc|masked]
#                              [--precision fp16] [--ep cuda] [--budget 16384] [--batch 64] [--sample 64]
#                              [--layers 12] [--spans-limit N] [--bin PATH] [--data DIR] [--work DIR]
#
# Steps (models and inputs persist in --work between calls on a warm machine):
#   export  `python -m virnuc_export --random dnabert_s --seed 0 --layers L --attention FLAVOR --precision P`
#           (tokenizer: the project's test tokenizer, trained on the lambda fixture; the real one's ids
#           would not change the timing of random weights)
#   embed   `virnuc-trt embed GENOMES --mode nucleotide --chunk 500 --model EXPORT` (its DNA spans per kept
#           frame), tokens/s and engine busy share from the run report
#   peer    tools/gpu/dnabert_peer.py peer: PyTorch padded batches (--batch, input order), SDPA with an
#           ALiBi + padding mask, fp16, on the same weights, over the same genomes' frame spans
#           (`virnuc-trt translate --dna`: the very spans embed makes)
#   check   dnabert_peer.py check: the export through ONNX Runtime (CUDA EP) on packs of --sample spans and
#           embed's HDF5 rows whose ids match, against PyTorch fp32 (TF32 off, each sequence alone);
#           the PyTorch reference itself against the float64 numpy reference (export/virnuc_export/
#           dnabert_reference.py); cosine >= 0.999
# Flavors: `ort` (PackedMultiHeadAttention + ALiBi attention_bias; CUDA EP) is the default; `virnuc`
# needs the CUDA VarlenAttention kernel's ALiBi mode (contract version 2); `masked` is the portable O(T²)
# form. Compare tokens/s: the peer embeds exactly the spans embed makes.
#
# Expects: the release binary (--bin, default .device-stage/bin/virnuc-trt), /opt/onnxruntime-gpu/env.sh
# sourced (ORT_DYLIB_PATH), python with torch (CUDA), onnxruntime-gpu, tokenizers, h5py, onnx. Results:
# $OUT/dnabert_bench.jsonl (one JSON line per step result) and $OUT/dnabert_bench.log; with no $OUT,
# out/gpu-bench/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

steps="export embed peer check"
flavor=ort
precision=fp16
ep=cuda
budget=16384
batch=64
sample=64
layers=12
spans_limit=
bin="$root/.device-stage/bin/virnuc-trt"
data="$root/.device-stage/data"
work="${TMPDIR:-/tmp}/virnuc-dnabert-bench"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --flavor) flavor="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    --ep) ep="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --sample) sample="$2"; shift 2 ;;
    --layers) layers="$2"; shift 2 ;;
    --spans-limit) spans_limit="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    -h|--help) sed -n '2,32p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "dnabert_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$flavor" in ort|virnuc|masked) ;; *) echo "dnabert_bench: --flavor ort|virnuc|masked" >&2; exit 2 ;; esac
case "$precision" in fp16|fp32) ;; *) echo "dnabert_bench: --precision fp16|fp32" >&2; exit 2 ;; esac
for n in "$budget" "$batch" "$sample" "$layers"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "dnabert_bench: numbers must be positive integers (got $n)" >&2; exit 2; }
done
results="${OUT:-$root/out/gpu-bench}"
mkdir -p "$results" "$work/out"
log="$results/dnabert_bench.log"
jsonl="$results/dnabert_bench.jsonl"
say() { printf '%s\n' "$*" | tee -a "$log" >&2; }
has() { [[ " $steps " == *" $1 "* ]]; }
export PYTHONPATH="$root/export${PYTHONPATH:+:$PYTHONPATH}"
say "== dnabert_bench $(date -u +%FT%TZ) commit $(cat .device-stage/bench/commit.txt 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo '?') on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
say "   steps: $steps | $flavor $precision, $layers layers | ep $ep, budget $budget | peer batch $batch"

genomes=()
for g in klebsiella_HS11286.fna.gz lambda_virus.fa; do
  if [[ -f "$data/$g" ]]; then genomes+=("$data/$g"); fi
done
if [[ ${#genomes[@]} -eq 0 ]]; then
  say "   no genomes in $data: using tests/fixtures/lambda_virus.fa only (small)"
  genomes=("$root/tests/fixtures/lambda_virus.fa")
fi

mdir="$work/models/dnabert_s-l$layers-$flavor-$precision"
spans="$work/spans.fa"
if has export && [[ ! -f "$mdir/model.json" ]]; then
  say "== export dnabert_s ($flavor, $precision, $layers layers, random seed 0) → $mdir"
  (cd export && python3 -m virnuc_export --random dnabert_s --seed 0 --layers "$layers" --attention "$flavor" \
    --precision "$precision" --out "$mdir") 2>&1 | tee -a "$log" >&2
fi
[[ -f "$mdir/model.json" ]] || { say "dnabert_bench: no export at $mdir (run the export step)"; exit 1; }
if [[ ! -f "$spans" ]]; then
  # The peer gets exactly the DNA that embed sends to the model (VirNucPro's overlapping chunks, the
  # same frame names), so tokens/s compare like for like and the check can match rows by id.
  "$bin" translate --dna --chunk 500 "${genomes[@]}" -o "$spans.all"
  if [[ -n "$spans_limit" ]]; then
    awk -v n="$spans_limit" '/^>/ {k++} k > n {exit} {print}' "$spans.all" > "$spans"
  else
    mv "$spans.all" "$spans"
  fi
  say "   spans: $(grep -c '^>' "$spans") frames → $spans"
fi

h5="$work/out/dnabert-$flavor-$precision.h5"
report="$work/out/dnabert-$flavor-$precision.report.json"
if has embed; then
  [[ -x "$bin" ]] || { say "dnabert_bench: no binary at $bin (cargo build --release -p virnuc-trt; copy it there)"; exit 1; }
  rm -rf "$h5" "$h5.partial"
  say "== embed (virnuc-trt, packed)"
  "$bin" embed "${genomes[@]}" --mode nucleotide --chunk 500 --model "$mdir" --out "$h5" --ep "$ep" \
    --toks-per-batch "$budget" --report "$report" -q 2>&1 | tee -a "$log" >&2
  python3 - "$report" >>"$jsonl" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("ep", "attention", "model_precision", "sequences", "tokens", "packs", "tokens_per_s", "sequences_per_s",
        "embed_wall_s", "wall_s", "engine_open_s", "warmup_s", "engine_busy_fraction", "padding_fraction",
        "token_budget")
row = {"step": "embed", **{k: r.get(k) for k in keys}}
print(json.dumps(row))
print(f"   embed: {row['tokens']} tokens, {row['tokens_per_s']} tokens/s, busy {row['engine_busy_fraction']}",
      file=sys.stderr)
PY
fi
if has peer; then
  say "== peer (PyTorch padded SDPA $precision, batch $batch)"
  python3 tools/gpu/dnabert_peer.py peer --spans "$spans" --tokenizer "$mdir/tokenizer.json" --seed 0 \
    --layers "$layers" --batch "$batch" --dtype "$precision" --json "$work/out/peer.json" 2>>"$log" \
    | sed 's/^{/{"step": "peer", /' | tee -a "$jsonl" >&2
fi
if has check; then
  say "== check ($sample spans, export and embed's output vs PyTorch fp32)"
  h5_arg=()
  if [[ -f "$h5" ]]; then h5_arg=(--h5 "$h5"); fi
  python3 tools/gpu/dnabert_peer.py check --spans "$spans" --tokenizer "$mdir/tokenizer.json" --seed 0 \
    --model "$mdir" --sample "$sample" "${h5_arg[@]}" --json "$work/out/check.json" 2>>"$log" \
    | sed 's/^{/{"step": "check", /' | tee -a "$jsonl" >&2 || say "   CHECK FAILED"
fi
say "== done: $jsonl"
