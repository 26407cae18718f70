"""ONNX Runtime GPU from Python on the GPU machine, next to torch.

The device image has only the CPU `onnxruntime`; `../shared/device/stage-ort-gpu` leaves the
onnxruntime-gpu 1.31.1 wheel (CUDA 13, cp312) in /opt/ort-stage and its libraries in
/opt/onnxruntime-gpu. `load()` installs that wheel once into a private folder (no registry needed:
`--no-deps` from the local file) and imports it ahead of the CPU package, so the Python peers run
the very build the Rust runtime loads.

Timing helpers bind torch CUDA tensors through IoBinding and run ORT on torch's current stream
(`user_compute_stream`), so CUDA events recorded by torch bracket exactly ORT's kernels.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

STAGE = Path(os.environ.get("ORT_STAGE", "/opt/ort-stage"))
TARGET = Path(os.environ.get("ORT_PY_TARGET", "/tmp/ort-gpu-py"))


def load() -> Any:
    """Import onnxruntime-gpu (installing the staged wheel on first use); fail loudly if no CUDA EP."""
    if not (TARGET / "onnxruntime").is_dir():
        wheels = sorted(glob.glob(str(STAGE / "onnxruntime_gpu-*.whl")))
        if not wheels:
            raise SystemExit(
                f"no onnxruntime-gpu wheel in {STAGE}: stage it first (../shared/device/stage-ort-gpu)"
            )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-index",
                "--target",
                str(TARGET),
                wheels[-1],
            ],
            check=True,
        )
    sys.path.insert(0, str(TARGET))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"onnxruntime {ort.__version__} from {ort.__file__} has no CUDA EP")
    return ort


NP_OF_TORCH = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.int32: np.int32,
    torch.int64: np.int64,
}


# CUDA EP `sdpa_kernel` bit flags (ORT's AttentionBackend): which attention kernels an attention op may use.
SDPA = {"flash": 1, "efficient": 2, "trt_fused": 4, "cudnn_flash": 8, "math": 16, "trt_flash": 32}


def session(ort: Any, model: str | bytes, opt_level: str = "all", sdpa: int | None = None) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    so.log_severity_level = 3
    stream = torch.cuda.current_stream().cuda_stream
    cuda = {"device_id": "0", "user_compute_stream": str(stream)}
    if sdpa is not None:
        cuda["sdpa_kernel"] = str(sdpa)
    return ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", cuda)])


def bind(ort: Any, sess: Any, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> Any:
    b = sess.io_binding()
    for name, t in {**inputs, **outputs}.items():
        fn = b.bind_input if name in inputs else b.bind_output
        fn(name, "cuda", 0, NP_OF_TORCH[t.dtype], list(t.shape), t.data_ptr())
    return b


def run_options(ort: Any) -> Any:
    # No host synchronisation at the end of each run: runs queue back to back on the stream, as
    # the Rust engine's do, and CUDA events time the GPU work alone.
    ro = ort.RunOptions()
    ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return ro


def cuda_kernel_times(fn: Any) -> dict[str, tuple[float, int]]:
    """Runs `fn` under torch.profiler and returns, per CUDA kernel (memsets and copies included),
    its summed GPU time in µs and its number of calls. CUPTI sees every kernel in the process,
    ONNX Runtime's included, whatever stream they ran on."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict[str, tuple[float, int]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(ev, "device_time_total", None) or ev.cuda_time_total
            total, calls = times.get(ev.name, (0.0, 0))
            times[ev.name] = (total + us, calls + 1)
    return times
