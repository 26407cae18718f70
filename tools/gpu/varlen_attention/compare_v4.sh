#!/usr/bin/env bash
# One device call comparing the current kernel (build/varlen_attention) with the v4 candidate
# (build/varlen_v4, from `bash plugins/varlen_attention/build.sh --v4`) on the same card:
#   correctness of both (float64 reference, 120 cases each) and v4's negative control, the
#   attention benchmark twice each, interleaved (base, v4, base, v4), once each at head_dim 128
#   (15B shape), a summary of ours / torch
#   flash per row (summary.txt), then compute-sanitizer memcheck of v4. Results under $OUT.
# Run from the project root on the GPU machine, carrying build/varlen_attention and build/varlen_v4:
#   bash tools/gpu/varlen_attention/compare_v4.sh [--quick]
# --quick skips the current kernel's check (unchanged source) and v4's memcheck.
set -uo pipefail
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out="${OUT:-/tmp/varlen_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=tools/gpu/varlen_attention/varlen_gpu.py
run=tools/gpu/varlen_attention/run.sh
status=0
t0=$SECONDS
for f in build/varlen_attention/varlen_attention.fatbin build/varlen_v4/varlen_attention.fatbin; do
  [[ -f "$f" ]] || { echo "missing $f (build it and carry its folder)"; exit 1; }
done
steps=(check-v4 control-v4)
[[ $quick == 1 ]] || steps+=(check)
OUT="$out" bash "$run" "${steps[@]}" || status=1
echo "== correctness done after $((SECONDS - t0)) s"
v4() { VARLEN_FATBIN=build/varlen_v4/varlen_attention.fatbin VARLEN_GEOMETRY=v4 "$@"; }
for rep in 1 2; do
  echo "== bench base (repeat $rep)"
  python3 "$py" bench --out "$out/bench_base_$rep.json" >"$out/bench_base_$rep.txt" 2>&1 || status=1
  tail -n 6 "$out/bench_base_$rep.txt"
  echo "== bench v4 (repeat $rep)"
  v4 python3 "$py" bench --out "$out/bench_v4_$rep.json" >"$out/bench_v4_$rep.txt" 2>&1 || status=1
  tail -n 6 "$out/bench_v4_$rep.txt"
done
echo "== head_dim 128 (15B shape), once each"
python3 "$py" bench-d128 --out "$out/bench_base_d128.json" >"$out/bench_base_d128.txt" 2>&1 || status=1
tail -n 4 "$out/bench_base_d128.txt"
v4 python3 "$py" bench-d128 --out "$out/bench_v4_d128.json" >"$out/bench_v4_d128.txt" 2>&1 || status=1
tail -n 4 "$out/bench_v4_d128.txt"
echo "== benches done after $((SECONDS - t0)) s"
python3 - "$out" <<'EOF' | tee "$out/summary.txt"
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {}
for name in ("base_1", "v4_1", "base_2", "v4_2", "base_d128", "v4_d128"):
    path = out / f"bench_{name}.json"
    if path.is_file():
        runs[name] = {(r["model"], r["mix"]): r for r in json.loads(path.read_text())}
keys = list(dict.fromkeys(k for rows in runs.values() for k in rows))
print("ours / torch flash (no rotary; < 1 is faster than flash), and rotary-fused us; same card")
print("| model | mix | run | no-rotary us | flash us | ratio | rotary us | agree vs torch |")
print("|---|---|---|---|---|---|---|---|")
for key in keys:
    for name, rows in runs.items():
        r = rows.get(key)
        if r is None:
            continue
        print(
            f"| {key[0]} | {key[1]} | {name} | {r['ours_no_rotary_us']:.1f} | {r['torch_flash_us']:.1f} "
            f"| {r['ours_no_rotary_us'] / r['torch_flash_us']:.3f} | {r['ours_rotary_us']:.1f} "
            f"| {r['agree_vs_torch']:.1e} |"
        )
EOF
# Last, so that a time limit cuts the slowest step and not the figures.
[[ $quick == 1 ]] || OUT="$out" bash "$run" memcheck-v4 || status=1
echo "compare_v4: exit status $status after $((SECONDS - t0)) s"
exit $status
