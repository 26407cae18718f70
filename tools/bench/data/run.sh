#!/usr/bin/env bash
# Data-path benchmark (issue #3): tokens/s delivered to a consumer that takes packs as fast as it can,
# packs, FFD utilization and peak RSS, over the real genomes and a generated ≥ 1 GB metagenome-like FASTA.
#   tools/bench/data/run.sh [OUT_DIR]     (default /tmp/virnuc-bench-data; the generated FASTA lives there)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=${1:-/tmp/virnuc-bench-data}
data=${VIRNUC_DATA:-tests/fixtures}
mkdir -p "$out"
cargo build --release -p virnuc-data --example bench_pipeline
bench=${CARGO_TARGET_DIR:-target}/release/examples/bench_pipeline
meta="$out/metagenome_1g.fa"
[[ -s $meta ]] || python3 tools/bench/data/gen_metagenome.py --data "$data" --out "$meta" --gb 1.0
[[ -s $meta.gz ]] || gzip -1 -c "$meta" > "$meta.gz"

run() {
  # One JSON line per run, with /usr/bin/time's peak RSS and CPU share appended.
  local json
  json=$(/usr/bin/time -f '%M %P %U %S' -o "$out/time.txt" "$bench" "$@")
  read -r rss cpu user sys < "$out/time.txt"
  echo "${json%\}},\"time_max_rss_kib\":$rss,\"cpu\":\"$cpu\",\"cpu_seconds\":$(awk "BEGIN{print $user + $sys}")}"
}
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run "$data/lambda_virus.fa"
run "$data/klebsiella_HS11286.fna.gz"
run --chunk 300 "$data/klebsiella_HS11286.fna.gz"
run "$meta"
run --chunk 300 "$meta"
run "$meta.gz"
run --workers 1 "$meta"
run --mode protein "$data/globins45.fa"
