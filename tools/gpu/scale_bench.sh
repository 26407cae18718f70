#!/usr/bin/env bash
# Scaling of `virnuc-trt embed` (and `predict`) over the GPUs of one host (issue 15), in one call:
# ESM-2 3B fp16 on chunk500, 1 GPU, then `--devices all`, same input, same binary; then `predict`
# (3B + DNABERT-S + classifier) the same way; then one `--devices all` run with worker 1
# killed mid-run by the fault switch. Per-GPU busy share from nvidia-smi sampling and from the run
# report's per-device section; the multi-GPU output compared with the 1-GPU run's.
#
#   tools/gpu/scale_bench.sh [--model esm2_t36_3B] [--flavor ort] [--budget 16384]
#                            [--tokens-per-gpu 1200000] [--steps "export one all predict fault"]
#                            [--bin PATH] [--data DIR] [--work DIR] [--cpu-dry-run]
#
# Steps:
#   export   random-weight models (seed 0, fp16) with the device's python (skipped when present): the
#            ESM-2 model and, for predict, DNABERT-S and a classifier (unless --predict-args is given)
#   one      embed on GPU 0 alone (--device 0)
#   all      embed --devices all: speed-up = tokens/s(all) / tokens/s(one); outputs compared
#   predict  the same two runs with `virnuc-trt predict` (--predict-args: other model flags); the
#            three result files must be byte-identical (--devices keeps the 1-process packs)
#   fault    embed --devices all with VIRNUC_FAULT_KILL_WORKER=1:P (P = a third of worker 1's packs in
#            the `all` run): the output must equal the `all` run's, the report must name worker 1
# Input: chunk500 (klebsiella_HS11286.fna.gz + lambda_virus.fa in nucleotide mode, 500 bp chunks),
# the files given as often as needed for >= --tokens-per-gpu tokens per GPU in the `all` run (the
# token count comes from `virnuc-trt translate`).
#
# --cpu-dry-run checks the script's logic without a GPU: esm2_t6_8M, --ep cpu, `--devices cpu:2`,
# lambda only, no nvidia-smi.
#
# Expects: the release binary (--bin, default .device-stage/bin/virnuc-trt), /opt/onnxruntime-gpu/env.sh
# sourced (ORT_DYLIB_PATH), python with torch, onnx, h5py, numpy. Results: $OUT/scale_bench.jsonl (one
# JSON line per run) and $OUT/scale_bench.log; with no $OUT, out/gpu-bench/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

model=esm2_t36_3B
flavor=ort
precision=fp16
budget=16384
tokens_per_gpu=1200000
steps="export one all predict fault"
bin="$root/.device-stage/bin/virnuc-trt"
data="$root/.device-stage/data"
work="${TMPDIR:-/tmp}/virnuc-scale-bench"
predict_args=""
dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --flavor) flavor="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --tokens-per-gpu) tokens_per_gpu="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --predict-args) predict_args="$2"; shift 2 ;;
    --cpu-dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "scale_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$budget" "$tokens_per_gpu"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "scale_bench: numbers must be positive integers (got $n)" >&2; exit 2; }
done
if [[ $dry == 1 ]]; then
  model=esm2_t6_8M flavor=virnuc precision=fp32 budget=1024 tokens_per_gpu=20000
  ep=cpu devices=cpu:2 one_dev=(--threads 1) all_dev=(--devices cpu:2 --threads 1) ngpu=2
  [[ -x "$bin" ]] || bin="$root/target/debug/virnuc-trt"
else
  ep=cuda devices=all one_dev=(--device 0) all_dev=(--devices all)
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  [[ "$ngpu" -ge 2 ]] || { echo "scale_bench: needs 2 or more GPUs (nvidia-smi lists ${ngpu:-0})" >&2; exit 1; }
fi
results="${OUT:-$root/out/gpu-bench}"
mkdir -p "$results" "$work/out"
log="$results/scale_bench.log"
jsonl="$results/scale_bench.jsonl"
say() { printf '%s\n' "$*" | tee -a "$log" >&2; }
has() { [[ " $steps " == *" $1 "* ]]; }
[[ -x "$bin" ]] || { say "scale_bench: no binary at $bin"; exit 1; }
export PYTHONPATH="$root/export${PYTHONPATH:+:$PYTHONPATH}"
commit=$(cat .device-stage/bench/commit.txt 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo '?')
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs || true)
say "== scale_bench $(date -u +%FT%TZ) commit $commit, $ngpu devices ($devices) on ${gpus:-no GPU}"
say "   $model $flavor $precision, budget $budget, >= $tokens_per_gpu tokens per device, steps: $steps"

genomes=()
if [[ $dry == 0 ]]; then
  for g in klebsiella_HS11286.fna.gz lambda_virus.fa; do
    [[ -f "$data/$g" ]] && genomes+=("$data/$g")
  done
fi
[[ ${#genomes[@]} -gt 0 ]] || genomes=("$root/tests/fixtures/lambda_virus.fa")
# Tokens of one copy of the input, from the proteins embed would send (+2 per sequence).
"$bin" translate "${genomes[@]}" --mode nucleotide --chunk 500 -o "$work/proteins.fa" 2>>"$log"
per_copy=$(python -c "
import sys
t = n = 0
for line in open(sys.argv[1]):
    if line.startswith('>'):
        n += 1
    else:
        t += len(line.strip())
print(t + 2 * n)" "$work/proteins.fa")
copies=$(( (tokens_per_gpu * ngpu + per_copy - 1) / per_copy ))
inputs=()
for _ in $(seq "$copies"); do inputs+=("${genomes[@]}"); done
say "   input: ${#genomes[@]} files x $copies copies = $(( per_copy * copies )) tokens ($per_copy per copy)"

mdir="$work/models/$model-$flavor-$precision"
if has export && [[ ! -f "$mdir/model.json" ]]; then
  say "== export $model ($flavor, $precision, random seed 0) -> $mdir"
  (cd export && python -m virnuc_export --random "$model" --seed 0 --attention "$flavor" \
    --precision "$precision" --out "$mdir") 2>&1 | tee -a "$log" >&2
fi

# predict's other two models (random weights, seed 0): DNABERT-S of the same flavor and precision and a
# classifier for 768 + H features, unless --predict-args names models of its own.
dna_dir="$work/models/dnabert_s-$flavor-$precision"
clf_dir="$work/models/classifier-$model"
if has export && has predict && [[ -z "$predict_args" ]]; then
  dna_layers=; [[ $dry == 1 ]] && dna_layers=1
  bash tools/gpu/predict_models.sh "$model" "$flavor" "$precision" "$mdir" "$dna_dir" "$clf_dir" ${dna_layers:+"$dna_layers"} \
    2>&1 | tee -a "$log" >&2
fi
[[ -n "$predict_args" ]] || predict_args="--esm $mdir --dnabert $dna_dir --classifier $clf_dir"

# Samples GPU utilization every 200 ms into $1 until stopped (no-op without nvidia-smi).
sampler_pid=
start_sampling() {
  sampler_pid=
  if [[ $dry == 0 ]]; then
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu --format=csv,noheader,nounits -lms 200 >"$1" 2>/dev/null &
    sampler_pid=$!
  fi
}
stop_sampling() {
  if [[ -n "$sampler_pid" ]]; then kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true; fi
}

# run NAME ENV-ASSIGNMENT|- ARGS...: one embed run with its report, GPU samples and a JSON line.
run_embed() {
  local name="$1" envset="$2"; shift 2
  local h5="$work/out/$name.h5" report="$work/out/$name.report.json" smi="$work/out/$name.smi.csv"
  rm -rf "$h5" "$h5.partial"
  say "== $name: embed $*"
  start_sampling "$smi"
  local rc=0
  if [[ "$envset" == - ]]; then
    "$bin" embed "${inputs[@]}" --mode nucleotide --chunk 500 --model "$mdir" --out "$h5" --ep "$ep" \
      --toks-per-batch "$budget" --report "$report" -q "$@" 2>>"$log" || rc=$?
  else
    env "$envset" "$bin" embed "${inputs[@]}" --mode nucleotide --chunk 500 --model "$mdir" --out "$h5" \
      --ep "$ep" --toks-per-batch "$budget" --report "$report" -q "$@" 2>>"$log" || rc=$?
  fi
  stop_sampling
  python - "$name" "$report" "$smi" "$rc" "$commit" >>"$jsonl" <<'PY'
import csv, json, os, sys
name, report, smi, rc, commit = sys.argv[1:6]
row = {"run": name, "commit": commit, "exit": int(rc)}
if os.path.exists(report):
    r = json.load(open(report))
    for k in ("ep", "model_name", "sequences", "tokens", "packs", "tokens_per_s", "embed_wall_s", "wall_s",
              "engine_open_s", "engine_busy_fraction", "devices"):
        row[k] = r.get(k)
if os.path.exists(smi) and os.path.getsize(smi) > 0:
    by_gpu = {}
    for rec in csv.reader(open(smi)):
        if len(rec) == 3 and rec[2].strip().isdigit():
            by_gpu.setdefault(rec[1].strip(), []).append(int(rec[2]))
    # The middle 80% of each GPU's samples: engine open and the tail do not count.
    row["nvidia_smi_busy_percent"] = {
        g: round(sum(v[len(v) // 10: len(v) - len(v) // 10 or None]) / max(1, len(v) - 2 * (len(v) // 10)), 1)
        for g, v in sorted(by_gpu.items())
    }
print(json.dumps(row))
PY
  tail -n1 "$jsonl" | python -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"   exit {r['exit']}: {r.get('tokens')} tokens, {r.get('tokens_per_s') or 0:.0f} tokens/s, busy \"
      f\"{100 * (r.get('engine_busy_fraction') or 0):.1f}%, per device \"
      f\"{[(d['device'], d['packs'], round(100 * d['busy_fraction'], 1), d['restarts'], d['failed']) for d in r.get('devices') or []]}, \"
      f\"nvidia-smi {r.get('nvidia_smi_busy_percent')}\")" | tee -a "$log" >&2
  return "$rc"
}

compare() {  # compare A B: same rows in the same order, embeddings within fp16 noise, bytes equal?
  python - "$work/out/$1.h5" "$work/out/$2.h5" <<'PY' | tee -a "$log" >&2
import sys, h5py, numpy as np
a, b = (h5py.File(p, "r") for p in sys.argv[1:3])
same_ids = list(a["sequence_ids"].asstr()[:]) == list(b["sequence_ids"].asstr()[:])
x, y = a["embeddings"][:].astype(np.float64), b["embeddings"][:].astype(np.float64)
cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-30)
identical = open(sys.argv[1], "rb").read() == open(sys.argv[2], "rb").read()
print(f"   compare: ids {'equal' if same_ids else 'DIFFER'}, rows {len(x)} vs {len(y)}, min cosine {cos.min():.6f}, "
      f"max |diff| {np.abs(x - y).max():.3g}, files {'byte-identical' if identical else 'differ in bytes'}")
sys.exit(0 if same_ids and len(x) == len(y) and cos.min() >= 0.999 else 1)
PY
}

status=0
if has one; then run_embed one - "${one_dev[@]}" || status=1; fi
if has all; then
  run_embed all - "${all_dev[@]}" || status=1
  if [[ -f "$work/out/one.h5" && -f "$work/out/all.h5" ]]; then
    compare one all || { say "   MISMATCH one vs all"; status=1; }
    python - "$work/out/one.report.json" "$work/out/all.report.json" "$ngpu" <<'PY' | tee -a "$log" >&2
import json, sys
one, all_, n = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
s = all_["tokens_per_s"] / one["tokens_per_s"]
print(f"   speed-up on {n} devices: {s:.2f}x (embed wall), whole command {one['wall_s'] / all_['wall_s']:.2f}x; "
      f"target {'1.9' if n == 2 else '3.8' if n == 4 else '-'}x")
PY
  fi
fi
if has predict; then
  if "$bin" predict --help 2>/dev/null | grep -q -- '--devices'; then
    for run in one all; do
      dev=("${one_dev[@]}"); [[ $run == all ]] && dev=("${all_dev[@]}")
      say "== predict-$run"
      t0=$(date +%s.%N)
      # shellcheck disable=SC2086
      "$bin" predict "${inputs[@]}" $predict_args --chunk 500 --toks-per-batch "$budget" \
        --out-dir "$work/out/predict-$run" --ep "$ep" -q "${dev[@]}" \
        2>>"$log" || status=1
      say "   predict-$run: $(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$t0" "$(date +%s.%N)")"
    done
    for f in prediction_results.txt prediction_results_highestscore.csv prediction_verdicts.tsv; do
      cmp "$work/out/predict-one/$f" "$work/out/predict-all/$f" 2>&1 | tee -a "$log" >&2 \
        || { say "   predict $f differs between 1 and $ngpu devices"; status=1; }
    done
  else
    say "== predict: skipped (this binary's predict has no --devices)"
  fi
fi
if has fault && [[ -f "$work/out/all.report.json" ]]; then
  packs=$(python -c "import json, sys; d = json.load(open(sys.argv[1]))['devices']; print(max(1, d[1]['packs'] // 3))" \
    "$work/out/all.report.json")
  run_embed fault "VIRNUC_FAULT_KILL_WORKER=1:$packs" "${all_dev[@]}" || status=1
  compare all fault || { say "   MISMATCH all vs fault"; status=1; }
  python -c "
import json, sys
d = json.load(open(sys.argv[1]))['devices'][1]
ok = d['restarts'] == 1 and len(d['deaths']) >= 1
print(f\"   fault: worker 1 ({d['device']}) restarts {d['restarts']}, deaths {d['deaths']}: {'named' if ok else 'NOT NAMED'}\")
sys.exit(0 if ok else 1)" "$work/out/fault.report.json" | tee -a "$log" >&2 || status=1
fi
say "== scale_bench done (status $status); results in $jsonl"
exit "$status"
