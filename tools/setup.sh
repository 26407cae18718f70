#!/usr/bin/env bash
# Installs everything the project needs into the checkout (idempotent, nothing global):
#   .venv/  Python 3 virtual environment with the locked requirements.txt (torch, transformers,
#           onnx, onnxruntime 1.31.1 whose libonnxruntime.so the Rust runtime loads, cmake for the
#           static HDF5 build, ruff, pytest).
# Source it (`source tools/setup.sh`) to get the environment; running it only installs.
#
# Written for being sourced into somebody's interactive shell: it sets no shell options there (a
# `set -e` left behind would close the terminal at the next failing command), and it checks every
# step itself, because errexit is off inside `source tools/setup.sh && …` and a failed install must
# never be stamped as done.

_virnuc_setup() {
  local root venv stamp want need_gib=8 free_kib ort_capi ort_lib
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  venv="$root/.venv"
  stamp="$venv/.requirements.sha256"
  want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)" || return 1
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "setup: creating $venv from requirements.txt (first run downloads ~3 GB and needs ~${need_gib} GiB: torch is the reference)" >&2
    free_kib="$(df -Pk "$root" | awk 'NR==2 {print $4}')"
    if [[ -n "$free_kib" && "$free_kib" -lt $((need_gib * 1024 * 1024)) ]]; then
      echo "setup: warning: only $((free_kib / 1024)) MiB free on the disk holding $root; the environment needs ~${need_gib} GiB" >&2
    fi
    # From scratch: --no-deps into an old venv would leave packages the lock no longer has.
    rm -rf "$venv"
    python3 -m venv "$venv" || { echo "setup: python3 -m venv $venv failed" >&2; return 1; }
    # --no-cache-dir: a pip cache would hold a second copy of every wheel (~3 GB) on a disk that is
    # not always large. --no-deps: requirements.txt is a full lock (see its header).
    if ! "$venv/bin/python" -m pip install --quiet --no-cache-dir --no-deps -r "$root/requirements.txt"; then
      echo "setup: installing requirements.txt into $venv failed (see pip's message above)" >&2
      return 1
    fi
    # A lock that misses a package must fail here, not as an ImportError in the middle of the tests.
    if ! "$venv/bin/python" -c 'import esm, h5py, numpy, onnx, onnxruntime, safetensors, torch, transformers, yaml'; then
      echo "setup: $venv is incomplete: requirements.txt misses a package (see the ImportError above)" >&2
      return 1
    fi
    echo "$want" >"$stamp" || return 1
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate" || return 1
  ort_capi="$("$venv/bin/python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')" || return 1
  ort_lib="$(ls "$ort_capi"/libonnxruntime.so.* 2>/dev/null | head -n1)"
  [[ -n "$ort_lib" ]] || { echo "setup: no libonnxruntime.so.* under $ort_capi" >&2; return 1; }
  export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ort_lib}"
  export VIRNUC_ROOT="$root"
  # Tests and examples must never touch a model hub.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}

if _virnuc_setup; then
  unset -f _virnuc_setup
else
  unset -f _virnuc_setup
  # `return` when sourced, `exit` when run.
  return 1 2>/dev/null || exit 1
fi
