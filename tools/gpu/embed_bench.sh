#!/usr/bin/env bash
# GPU smoke test and benchmark of `virnuc-trt embed`, end to end (FASTA → HDF5), on the GPU machine.
#
#   tools/gpu/embed_bench.sh [--models "esm2_t33_650M esm2_t36_3B"] [--workloads "chunk500 broad"]
#                            [--steps "export embed check"] [--ep cuda] [--flavor ort] [--budget 16384]
#                            [--tokens 300000] [--sample 64] [--bin PATH] [--data DIR] [--work DIR]
#
# Steps, runnable in parts (models and workloads persist in --work between calls on a warm machine):
#   export  random-weight models (seed 0, fp16, --flavor) with the device's python and export/
#   embed   virnuc-trt embed per model × workload; prints tokens/s and engine (GPU) busy share
#   check   cosine of a sample of mean embeddings against a PyTorch fp32 reference (≥ 0.999)
# Workloads:
#   chunk500  the genomes in --data (klebsiella_HS11286.fna.gz, lambda_virus.fa) in nucleotide mode:
#             500 bp chunks, six frames, stop-free frames — VirNucPro's input, the product's main path
#   broad     synthetic proteins, log-normal lengths 50-1024 tokens (tools/bench/workloads.py), protein mode
#
# Expects: the release binary (--bin, default .device-stage/bin/virnuc-trt, carried in an ignored
# folder), /opt/onnxruntime-gpu/env.sh sourced (ORT_DYLIB_PATH), python with torch, onnx, transformers,
# h5py. Results: $OUT/embed_bench.jsonl (one JSON line per run: the run report's key figures and the
# check) and $OUT/embed_bench.log; with no $OUT, out/gpu-bench/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

models="esm2_t33_650M esm2_t36_3B"
workloads="chunk500 broad"
steps="export embed check"
ep=cuda
flavor=ort
precision=fp16
budget=16384
tokens=300000
sample=64
bin="$root/.device-stage/bin/virnuc-trt"
data="$root/.device-stage/data"
work="${TMPDIR:-/tmp}/virnuc-embed-bench"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --workloads) workloads="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --ep) ep="$2"; shift 2 ;;
    --flavor) flavor="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    --sample) sample="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "embed_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
results="${OUT:-$root/out/gpu-bench}"
mkdir -p "$results" "$work"
log="$results/embed_bench.log"
jsonl="$results/embed_bench.jsonl"
say() { printf '%s\n' "$*" | tee -a "$log" >&2; }
has() { [[ " $steps " == *" $1 "* ]]; }

[[ -x "$bin" ]] || { say "embed_bench: no binary at $bin (build: cargo build --release -p virnuc-trt; copy it there)"; exit 1; }
[[ -n "${ORT_DYLIB_PATH:-}" ]] || say "embed_bench: ORT_DYLIB_PATH unset (source /opt/onnxruntime-gpu/env.sh); the binary tries its defaults"
say "== embed_bench $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
say "   models: $models | workloads: $workloads | steps: $steps | ep $ep, $flavor $precision, budget $budget"
export PYTHONPATH="$root/export:$root/tools/bench${PYTHONPATH:+:$PYTHONPATH}"

# Workload inputs (cheap; made whenever missing).
genomes=()
for g in klebsiella_HS11286.fna.gz lambda_virus.fa; do
  if [[ -f "$data/$g" ]]; then genomes+=("$data/$g"); fi
done
if [[ ${#genomes[@]} -eq 0 ]]; then
  say "   no genomes in $data: chunk500 uses tests/fixtures/lambda_virus.fa only (small)"
  genomes=("$root/tests/fixtures/lambda_virus.fa")
fi
broad_fa="$work/broad.fa"
pool_fa="$work/chunk500-proteins.fa"
if [[ " $workloads " == *" broad "* && ! -f "$broad_fa" ]]; then
  python -c "import sys; from pathlib import Path; from workloads import broad; w = broad(Path(sys.argv[1]), int(sys.argv[2]), 0); print(w.sequences, w.tokens)" \
    "$broad_fa" "$tokens" | while read -r n t; do say "   broad: $n proteins, $t tokens"; done
fi
if [[ " $workloads " == *" chunk500 "* && ! -f "$pool_fa" ]]; then
  # The exact proteins embed sends in nucleotide mode (for the check's reference).
  "$bin" translate "${genomes[@]}" --mode nucleotide --chunk 500 -o "$pool_fa" 2>>"$log"
fi

for model in $models; do
  mdir="$work/models/$model-$flavor-$precision"
  if has export && [[ ! -f "$mdir/model.json" ]]; then
    say "== export $model ($flavor, $precision, random seed 0) → $mdir"
    t0=$(date +%s)
    (cd export && python -m virnuc_export --random "$model" --seed 0 --attention "$flavor" \
      --precision "$precision" --out "$mdir") 2>&1 | tee -a "$log" >&2
    say "   export took $(( $(date +%s) - t0 )) s"
  fi
  for w in $workloads; do
    case "$w" in
      chunk500) inputs=("${genomes[@]}"); mode=(--mode nucleotide --chunk 500); fasta="$pool_fa" ;;
      broad) inputs=("$broad_fa"); mode=(--mode protein); fasta="$broad_fa" ;;
      *) say "unknown workload $w"; exit 2 ;;
    esac
    h5="$work/out/$model-$w.h5"
    report="$work/out/$model-$w.report.json"
    check="$work/out/$model-$w.check.json"
    mkdir -p "$work/out"
    if has embed; then
      rm -rf "$h5" "$h5.partial"
      say "== embed $model / $w"
      "$bin" embed "${inputs[@]}" "${mode[@]}" --model "$mdir" --out "$h5" --ep "$ep" \
        --toks-per-batch "$budget" --report "$report" -q 2>&1 | tee -a "$log" >&2
      python - "$report" <<'PY' | tee -a "$log" >&2
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   {r['model_name']} {r['attention']} {r['model_precision']} on {r['ep']}: "
      f"{r['sequences']} seqs, {r['tokens']} tokens, {r['tokens_per_s']:.0f} tokens/s "
      f"(embed wall {r['embed_wall_s']:.2f} s, whole command {r['wall_s']:.1f} s, open {r['engine_open_s']:.1f} s, "
      f"warm-up {r['warmup_s']:.1f} s), engine busy {100 * r['engine_busy_fraction']:.1f}%, "
      f"starved {r['engine_starved_s']:.2f} s, padding {100 * r['padding_fraction']:.1f}%")
PY
    fi
    if has check && [[ -f "$h5" ]]; then
      say "== check $model / $w: $sample sequences vs PyTorch fp32"
      python tools/gpu/embed_check.py --h5 "$h5" --fasta "$fasta" --random "$model" --seed 0 \
        --sample "$sample" --json "$check" 2>&1 | tee -a "$log" >&2 || say "   CHECK FAILED ($model / $w)"
    fi
    python - "$model" "$w" "$report" "$check" >>"$jsonl" <<'PY'
import json, os, sys
model, w, report, check = sys.argv[1:5]
keys = ("ep", "attention", "model_precision", "sequences", "tokens", "packs", "tokens_per_s",
        "sequences_per_s", "embed_wall_s", "wall_s", "engine_open_s", "warmup_s",
        "engine_busy_fraction", "engine_idle_fraction", "engine_starved_s", "padding_fraction", "token_budget")
row = {"model": model, "workload": w}
if os.path.exists(report):
    r = json.load(open(report))
    row.update({k: r.get(k) for k in keys})
if os.path.exists(check):
    row["check"] = json.load(open(check))
print(json.dumps(row))
PY
  done
done
say "== done: $jsonl"
