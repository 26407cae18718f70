"""What the card did during a run: busy % and memory sampled through NVML (nvidia-ml-py's `pynvml`), with
`nvidia-smi` as the fallback; the device's name; and the measured fp16 matrix-product ceiling that the
arithmetic limit is computed from."""

from __future__ import annotations

import platform
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    t: float  # perf_counter seconds
    busy: float  # percent of the last sampling period in which a kernel ran (NVML utilization.gpu)
    used: int  # device memory in use, bytes


@dataclass
class GpuMonitor:
    """Samples GPU 0 every `interval_s` in a thread between `start()` and `stop()`."""

    index: int = 0
    interval_s: float = 0.02
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _nvml: Any = None
    _handle: Any = None
    _smi: subprocess.Popen[str] | None = None

    def __post_init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # no NVML: nvidia-smi or nothing
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None or shutil.which("nvidia-smi") is not None

    def used_bytes(self) -> int | None:
        if self._nvml is not None:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        if shutil.which("nvidia-smi"):
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=memory.used",
                    "--format=csv,noheader,nounits",
                    f"-i={self.index}",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            return int(float(out.splitlines()[0]) * 2**20) if out else None
        return None

    def _loop(self) -> None:
        nvml, handle = self._nvml, self._handle
        while not self._stop.is_set():
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            self.samples.append(Sample(time.perf_counter(), float(util.gpu), int(mem.used)))
            self._stop.wait(self.interval_s)

    def _smi_reader(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2:
                try:
                    self.samples.append(
                        Sample(time.perf_counter(), float(parts[0]), int(float(parts[1]) * 2**20))
                    )
                except ValueError:
                    continue

    def start(self) -> None:
        self.samples = []
        self._stop.clear()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
        elif shutil.which("nvidia-smi"):
            ms = max(int(self.interval_s * 1000), 50)
            self._smi = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"-i={self.index}",
                    f"-lms={ms}",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._thread = threading.Thread(target=self._smi_reader, daemon=True)
        if self._thread is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()
            self._smi = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def busy_pct(self, t_from: float | None = None, t_to: float | None = None) -> float | None:
        """Mean utilization over the samples in [t_from, t_to] (the timed run, model load left out)."""
        xs = [
            s.busy
            for s in self.samples
            if (t_from is None or s.t >= t_from) and (t_to is None or s.t <= t_to)
        ]
        return sum(xs) / len(xs) if xs else None

    def peak_used(self) -> int | None:
        return max((s.used for s in self.samples), default=None)


def device_info(use_cuda: bool) -> dict[str, str]:
    """Name, driver and memory of GPU 0 (nvidia-smi), or the CPU model and core count."""
    if use_cuda and shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader", "-i=0"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if out:
            name, driver, mem = (p.strip() for p in out.splitlines()[0].split(","))
            return {"name": name, "driver": driver, "memory": mem}
    if use_cuda:
        import torch

        return {"name": torch.cuda.get_device_name(0), "driver": "?", "memory": "?"}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {"name": f"{model}, {cores} cores", "driver": "-", "memory": "-"}


def matmul_ceiling_tflops(use_cuda: bool, size: int = 8192, iters: int = 100) -> float:
    """Measured dense matrix-product rate: fp16 on the GPU (the figure the arithmetic limit divides by),
    fp32 on the CPU (smaller, since a CPU is far slower)."""
    import torch

    if use_cuda:
        a = torch.randn(size, size, device="cuda", dtype=torch.float16)
        b = torch.randn(size, size, device="cuda", dtype=torch.float16)
        for _ in range(10):  # let the clocks settle before timing
            torch.matmul(a, b)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000.0
        del a, b
        torch.cuda.empty_cache()
        return 2.0 * size**3 * iters / seconds / 1e12
    n, reps = 2048, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e12
