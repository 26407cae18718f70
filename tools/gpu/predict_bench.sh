#!/usr/bin/env bash
# GPU figure of issue 14 item 4: `virnuc-trt predict` with ESM-2 3B + DNABERT-S against `virnuc-trt
# embed` with ESM-2 3B alone, same input, same GPU, same call (target: predict ≥ 0.95× embed, in
# frames/s — DNABERT-S on each frame's DNA span is the extra work both engines share the GPU for).
#
#   tools/gpu/predict_bench.sh [--esm esm2_t36_3B] [--ep cuda] [--flavor ort] [--precision fp16]
#                              [--budget 16384] [--bases 3000000] [--passes 2] [--bin PATH]
#                              [--data DIR] [--work DIR]
#
# Steps: export (random weights, seed 0: ESM-2 --esm, DNABERT-S 12 layers with the project's test
# tokenizer, a classifier for 768 + H) with the device's python and export/; build the input: the
# first --bases of the genomes in --data (klebsiella_HS11286.fna.gz, lambda_virus.fa) as one FASTA;
# then --passes alternating runs of `embed` (nucleotide mode, --chunk 500, VirNucPro compat) and
# `predict` (--chunk 500), each a fresh process as a user runs it. Reports both commands' frames/s
# (sequences / engine wall time), their ratio, and the engines' GPU busy shares.
#
# Expects: the release binary (--bin, default .device-stage/bin/virnuc-trt, carried in an ignored
# folder), /opt/onnxruntime-gpu/env.sh sourced (ORT_DYLIB_PATH), python with torch, onnx, tokenizers,
# safetensors; the genomes staged in --data (tools/bench/run.py prepare). Results: $OUT/predict_bench.jsonl
# (one JSON line per run) and $OUT/predict_bench.log; with no $OUT, out/gpu-bench/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

esm=esm2_t36_3B
ep=cuda
flavor=ort
precision=fp16
budget=16384
bases=3000000
passes=2
bin="$root/.device-stage/bin/virnuc-trt"
data="$root/.device-stage/data"
work="${TMPDIR:-/tmp}/virnuc-predict-bench"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --esm) esm="$2"; shift 2 ;;
    --ep) ep="$2"; shift 2 ;;
    --flavor) flavor="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --bases) bases="$2"; shift 2 ;;
    --passes) passes="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "predict_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
results="${OUT:-$root/out/gpu-bench}"
mkdir -p "$results" "$work"
log="$results/predict_bench.log"
jsonl="$results/predict_bench.jsonl"
say() { printf '%s\n' "$*" | tee -a "$log" >&2; }
[[ -x "$bin" ]] || { say "predict_bench: no binary at $bin (--bin)"; exit 1; }

esm_dir="$work/$esm-$flavor-$precision"
dna_dir="$work/dnabert_s-$flavor-$precision"
clf_dir="$work/classifier-$esm"
bash tools/gpu/predict_models.sh "$esm" "$flavor" "$precision" "$esm_dir" "$dna_dir" "$clf_dir" 2>&1 \
  | tee -a "$log" >&2

input="$work/genomes_${bases}.fa"
if [[ ! -f "$input" ]]; then
  python3 - "$data" "$bases" "$input" <<'PY'
import gzip, sys
from pathlib import Path
data, left, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
with out.open("w") as f:
    for name in ("klebsiella_HS11286.fna.gz", "lambda_virus.fa"):
        p = data / name
        opener = gzip.open if name.endswith(".gz") else open
        rid, seq = None, []
        def flush():
            global left
            if rid and left > 0:
                s = "".join(seq)[:left]
                left -= len(s)
                f.write(f">{rid}\n{s}\n")
        with opener(p, "rt") as g:
            for line in g:
                if line.startswith(">"):
                    flush(); rid, seq = line[1:].split()[0], []
                else:
                    seq.append(line.strip())
        flush()
PY
fi

common=(--ep "$ep" --toks-per-batch "$budget" -q)
for pass in $(seq 1 "$passes"); do
  rm -rf "$work/embed.h5" "$work/embed.h5.partial" "$work/predict"
  say "== pass $pass: embed $esm alone"
  "$bin" embed "$input" --model "$esm_dir" --mode nucleotide --chunk 500 --virnucpro-compat \
    --out "$work/embed.h5" --report "$work/embed.json" "${common[@]}" 2>&1 | tee -a "$log"
  say "== pass $pass: predict $esm + DNABERT-S + classifier"
  "$bin" predict "$input" --esm "$esm_dir" --dnabert "$dna_dir" --classifier "$clf_dir" --chunk 500 \
    --out-dir "$work/predict" "${common[@]}" 2>&1 | tee -a "$log"
  python3 - "$work/embed.json" "$work/predict/predict_report.json" "$pass" "$esm" "$flavor" \
    "$precision" >>"$jsonl" <<'PY'
import json, sys
e, p = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
embed_fps = e["sequences_this_run"] / e["embed_wall_s"]
predict_fps = p["frames_this_run"] / p["predict_wall_s"]
row = {
    "pass": int(sys.argv[3]), "esm": sys.argv[4], "flavor": sys.argv[5], "precision": sys.argv[6],
    "frames": p["frames"], "embed_frames_per_s": embed_fps, "predict_frames_per_s": predict_fps,
    "predict_over_embed": predict_fps / embed_fps, "embed_busy": e["engine_busy_fraction"],
    "predict_esm_busy": p["esm_engine"]["busy_fraction"],
    "predict_dnabert_busy": p["dnabert_engine"]["busy_fraction"],
    "embed_tokens": e["tokens"], "predict_esm_tokens": p["esm_engine"]["tokens"],
    "predict_dnabert_tokens": p["dnabert_engine"]["tokens"],
}
print(json.dumps(row))
print(f"predict/embed = {row['predict_over_embed']:.3f} ({predict_fps:.0f} vs {embed_fps:.0f} frames/s)",
      file=sys.stderr)
PY
done
say "results: $jsonl"
