#!/usr/bin/env bash
# Opt-in check of the workflow's Slurm profile against a real Slurm: a single-node Slurm (Debian's
# slurm-wlm and munge) started here in a temporary folder, the workflow's embed and predict stages
# submitted through snakemake's Slurm executor plugin with workflow/profiles/slurm, and the
# results compared with one `virnuc-trt embed` / `virnuc-trt predict` on this machine (CPU, the demo
# models with random weights, a few records).
#
#   sudo tools/slurm_check.sh        # or as root; VIRNUC_SLURM_KEEP=1 keeps the folder
#
# Exit 0: passed; 77: skipped (not root, or slurm-wlm/munge cannot be installed), with the reason;
# anything else: failed. Not part of tools/test.sh: it installs system packages and starts daemons
# (munged, slurmctld, slurmd, all with their files in the temporary folder, stopped at the end; the
# configuration is also placed as /etc/slurm/slurm.conf for the run when there is none, and removed).
#
# What differs from a real cluster's use of the profile: the node has no GPU, so the test profile is
# the repository's with `gpu: 0` and the shard jobs' cpus/memory scaled to this machine; partition
# (`gpu`, the profile's default) and everything else are the profile's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

skip() {
  echo "slurm_check: SKIPPED: $*" >&2
  exit 77
}
say() { echo "slurm_check: $*" >&2; }

[ "$(id -u)" = 0 ] || skip "needs root (it installs slurm-wlm and munge and starts their daemons)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || skip "slurm-wlm is not installed and there is no apt-get"
  say "installing slurm-wlm and munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null ||
    skip "apt-get install slurm-wlm munge failed"
fi

# shellcheck disable=SC1091
source tools/setup.sh
cargo build --quiet -p virnuc-trt
BIN=$ROOT/target/debug/virnuc-trt

W=$(mktemp -d /tmp/virnuc-slurm.XXXXXX)
PIDS=()
PLACED_CONF=
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "$PLACED_CONF" ] && rm -f "$PLACED_CONF"
  if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
    for log in "$W"/slurmctld.log "$W"/slurmd.log; do
      [ -f "$log" ] && { echo "--- $log (last lines)" >&2; tail -n 20 "$log" >&2; }
    done
  fi
  if [ "${VIRNUC_SLURM_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    say "files kept in $W"
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
mkdir -p "$W"/state "$W"/spool "$W"/run
umask 077
head -c 1024 /dev/urandom >"$W"/munge.key
umask 022
munged --force --key-file="$W"/munge.key --socket="$W"/munge.sock --pid-file="$W"/munged.pid \
  --log-file="$W"/munged.log --seed-file="$W"/munge.seed
for _ in $(seq 50); do [ -s "$W"/munged.pid ] && break; sleep 0.1; done
PIDS+=("$(cat "$W"/munged.pid)")

cat >"$W"/slurm.conf <<EOF
ClusterName=virnuccheck
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$W/munge.sock
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=gpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$W/slurm.conf
# The job steps (`srun` inside a job, as snakemake's jobstep plugin runs them) read the default
# slurm.conf, not SLURM_CONF: put ours there for the run, unless the machine has one.
DEFAULT_CONF=/etc/slurm/slurm.conf
if [ -e "$DEFAULT_CONF" ]; then
  cmp -s "$DEFAULT_CONF" "$SLURM_CONF" || skip "$DEFAULT_CONF exists (a configured Slurm): not touching it"
else
  mkdir -p /etc/slurm
  cp "$SLURM_CONF" "$DEFAULT_CONF"
  PLACED_CONF=$DEFAULT_CONF
fi
slurmctld -D -i -f "$SLURM_CONF" &
PIDS+=("$!")
slurmd -D -f "$SLURM_CONF" -N "$HOST" &
PIDS+=("$!")
for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 1
done
[ "$state" = idle ] || { say "the node did not come up (state '${state:-none}')"; exit 1; }
say "single-node Slurm up: $(sinfo -h -o '%P %D %t %c cpus')"

# The demo models (random weights), the input, the workflow's config and the test profile.
(cd export &&
  python -m virnuc_export --random esm2_t6_8M --seed 0 --attention virnuc --out "$W"/esm &&
  python -m virnuc_export --random dnabert_s --layers 2 --seed 0 --attention virnuc --out "$W"/dnabert &&
  python -m virnuc_export --random-classifier --esm-dim 320 --seed 1 --out "$W"/clf) >"$W"/export.log 2>&1
python - "$W" <<'EOF'
import sys
from pathlib import Path

import yaml

w = Path(sys.argv[1])
lam = "".join(ln.strip() for ln in Path("tests/fixtures/lambda_virus.fa").read_text().splitlines()[1:])
(w / "in.fa").write_text("".join(f">lam_{k}\n{lam[k * 3000 : k * 3000 + 1500 + 300 * k]}\n" for k in range(5)))
profile = yaml.safe_load(Path("workflow/profiles/slurm/config.yaml").read_text())
for rule in profile["set-resources"].values():
    rule.update(gpu=0, cpus_per_task=1, mem_mb=1000)
profile["default-resources"]["mem_mb"] = 1000
(w / "profile").mkdir()
(w / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
config = {
    "stages": ["embed", "predict"],
    "inputs": [str(w / "in.fa")],
    "model": str(w / "esm"),
    "esm": str(w / "esm"),
    "dnabert": str(w / "dnabert"),
    "classifier": str(w / "clf"),
    "shards": 3,
    "out": "out/embeddings.h5",
    "parts_dir": "out/parts",
    "predict_out": "out/predict",
    "binary": str(Path("target/debug/virnuc-trt").resolve()),
    "embed_args": ["--ep", "cpu", "--chunk", "300", "--threads", "1"],
    "predict_args": ["--ep", "cpu", "--chunk", "300", "--toks-per-batch", "102", "--threads", "1"],
    "threads": 1,
    "gpus": 0,
    "mem_mb": 1000,
}
(w / "config.yaml").write_text(yaml.safe_dump(config))
EOF

say "running the workflow through Slurm (workflow/profiles/slurm, gpu: 0)"
python -m snakemake -s workflow/Snakefile --configfile "$W"/config.yaml --workflow-profile "$W"/profile \
  --directory "$W"/run --slurm-no-account --slurm-status-command squeue \
  --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs --quiet rules >"$W"/snakemake.log 2>&1 ||
  { tail -n 40 "$W"/snakemake.log >&2; say "FAILED: snakemake through Slurm"; exit 1; }
jobs=$(find "$W"/run/.snakemake/slurm_logs -name '*.log' 2>/dev/null | wc -l)
[ "$jobs" -ge 9 ] || { say "FAILED: $jobs Slurm job logs, expected 3 + 1 embed and 3 + 2 predict jobs"; exit 1; }

say "comparing with one embed and one predict on this machine"
"$BIN" predict "$W"/in.fa --esm "$W"/esm --dnabert "$W"/dnabert --classifier "$W"/clf --out-dir "$W"/single \
  -q --ep cpu --chunk 300 --toks-per-batch 102 --threads 1 2>/dev/null
"$BIN" embed "$W"/in.fa --model "$W"/esm --out "$W"/single.h5 -q --ep cpu --chunk 300 --threads 1 >/dev/null
for f in prediction_results.txt prediction_results_highestscore.csv prediction_verdicts.tsv prediction_scores.h5; do
  cmp -s "$W"/run/out/predict/$f "$W"/single/$f || { say "FAILED: $f differs from one predict"; exit 1; }
done
python - "$W" <<'EOF'
import sys

import h5py
import numpy as np

w = sys.argv[1]
with h5py.File(f"{w}/run/out/embeddings.h5") as a, h5py.File(f"{w}/single.h5") as b:
    assert list(a["sequence_ids"].asstr()[:]) == list(b["sequence_ids"].asstr()[:]), "embed ids differ"
    # Shards pack differently from the single run: equal up to float32 rounding.
    np.testing.assert_allclose(a["embeddings"][:], b["embeddings"][:], rtol=1e-4, atol=1e-5)
EOF
say "PASSED: $jobs jobs through Slurm; the predict stage's files equal one predict byte for byte, the embed stage's rows one embed's"
