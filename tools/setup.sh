#!/usr/bin/env bash
# Installs everything the project needs into the checkout (idempotent, nothing global):
#   .venv/  Python 3 virtual environment with the pinned requirements.txt (torch, transformers,
#           onnx, onnxruntime 1.31.1 whose libonnxruntime.so the Rust runtime loads, cmake for the
#           static HDF5 build, ruff, pytest).
# Source it (`source tools/setup.sh`) to get the environment; running it only installs.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv"
_stamp="$_venv/.requirements.sha256"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
_need_gib=8
if [[ ! -f "$_stamp" || "$(cat "$_stamp")" != "$_want" ]]; then
  echo "setup: creating $_venv from requirements.txt (first run downloads ~3 GB and needs ~${_need_gib} GiB: torch is the reference)" >&2
  _free_kib="$(df -Pk "$_root" | awk 'NR==2 {print $4}')"
  if [[ -n "$_free_kib" && "$_free_kib" -lt $((_need_gib * 1024 * 1024)) ]]; then
    echo "setup: warning: only $((_free_kib / 1024)) MiB free on the disk holding $_root; the environment needs ~${_need_gib} GiB" >&2
  fi
  rm -rf "$_venv"
  python3 -m venv "$_venv"
  # --no-cache-dir: a pip cache would hold a second copy of every wheel (~3 GB) on a disk that is
  # not always large. --no-deps: requirements.txt is a full lock (see its header).
  "$_venv/bin/python" -m pip install --quiet --no-cache-dir --no-deps -r "$_root/requirements.txt"
  # A lock that misses a package must fail here, not as an ImportError in the middle of the tests.
  "$_venv/bin/python" -c 'import esm, h5py, numpy, onnx, onnxruntime, safetensors, torch, transformers, yaml'
  echo "$_want" >"$_stamp"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
_ort_capi="$("$_venv/bin/python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
_ort_lib="$(ls "$_ort_capi"/libonnxruntime.so.* 2>/dev/null | head -n1)"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$_ort_lib}"
export VIRNUC_ROOT="$_root"
# Tests and examples must never touch a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset _root _venv _stamp _want _need_gib _free_kib _ort_capi _ort_lib
