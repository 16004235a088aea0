"""What the benchmarks record about the machine they ran on, its measured matmul peak, and peak memory of a child.

Imported by encode.py, train_step.py and dataload.py (`sys.path` holds this folder when they run as scripts).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Fields every benchmark record carries: CPU, cores, load, torch, threads."""
    return {"machine": platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def matmul_peak(size: int = 2048, repeats: int = 7) -> dict[str, float]:
    """The float32 matmul rate this machine reaches, in GFLOP/s (the best of `repeats`: a ceiling, which other jobs
    on the machine can only lower): `torch.mm` (the BLAS PyTorch was built with) and oneDNN's kernel
    (`clip_pacl.models.inference.dense`), on size x size matrices."""
    from clip_pacl.models.inference import dense

    a, b = torch.randn(size, size), torch.randn(size, size)
    rates = {}
    with torch.inference_mode():
        for name, fn in (("mm", lambda: torch.mm(a, b)), ("onednn", lambda: dense(a, b, None))):
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            rates[f"peak_{name}_gflop_s"] = round(2 * size**3 / min(times) / 1e9, 1)
    rates["peak_gflop_s"] = max(rates.values())
    return rates


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss), in MiB."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1 if sys.platform != "darwin" else 1024) / 1024, 1)


def current_rss_mb() -> float:
    """This process's resident set size now (Linux), in MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return 0.0


def run_child(args: list[str], timeout: float = 900) -> dict:
    """Run `python args...` (a benchmark's child mode that prints one JSON object last) and return that object."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
