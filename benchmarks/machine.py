"""What the benchmarks record about the machine they ran on (GPU included), its measured matmul peak, device timing
and peak memory (RSS on CPU, the CUDA caching allocator's peak on a GPU).

Imported by the benchmark scripts (`sys.path` holds this folder when they run as scripts).
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


# The flags that decide which kernels run fast: vector width (AVX2, AVX-512), native bfloat16 (AVX-512 BF16, AMX)
# and int8 (VNNI, AMX).
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
                     "amx_int8", "amx_fp16")


def cpu_flags_that_matter() -> list[str]:
    """Which of `FLAGS_THAT_MATTER` this CPU has (Linux's /proc/cpuinfo), in that order."""
    from clip_pacl.device import cpu_flags

    flags = cpu_flags()
    return [flag for flag in FLAGS_THAT_MATTER if flag in flags]


def device_or_exit(name: str) -> torch.device:
    """`--device NAME` as a torch.device; a one-line error (exit 1) when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device cuda, but torch {torch.__version__} sees no CUDA device "
                         f"(built for CUDA {torch.version.cuda})")
    return torch.device(name)


def machine_info(device: str | torch.device = "cpu") -> dict:
    """Fields every benchmark record carries: CPU, cores, load, torch, threads, the device; on CUDA the GPU's name,
    memory, compute capability, count and the CUDA version torch was built with."""
    device = torch.device(device)
    info = {"machine": platform.machine(), "cpu": cpu_model(), "cpu_flags": cpu_flags_that_matter(),
            "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "gpu_capability": f"{props.major}.{props.minor}", "gpu_count": torch.cuda.device_count(),
                     "cuda": torch.version.cuda})
    return info


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: read a timer only after this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_mib` (CUDA only: a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_mib(device: torch.device) -> float:
    """Tensor memory held now, in MiB: the CUDA caching allocator's allocated bytes, or the process's RSS on CPU."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else current_rss_mb()


def peak_memory_mib(device: torch.device) -> float:
    """Peak tensor memory since `reset_peak_memory` (CUDA: max_memory_allocated), or the process's peak RSS."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else peak_rss_mb()


def _best_seconds(fn, device: torch.device, repeats: int, calls: int) -> tuple[float, float]:
    """The fastest of `repeats` timings of `calls` back-to-back calls, per call (one warm-up round first): wall
    seconds, and this process's CPU seconds (all its threads; on a shared machine other jobs lengthen the first
    more than the second)."""
    walls, cpus = [], []
    for _ in range(repeats + 1):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        synchronize(device)
        walls.append((time.perf_counter() - start) / calls)
        cpus.append((time.process_time() - start_cpu) / calls)
    return min(walls[1:]), min(cpus[1:])


def matmul_peak(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                size: int | None = None, repeats: int = 7) -> dict:
    """The matmul rate this machine reaches in `dtype`, in GFLOP/s (the best of `repeats`: a ceiling, which other
    jobs on the machine can only lower), on size x size matrices (default 2048 on CPU, 8192 on a GPU, where
    ten products run back to back per timing). `torch.mm` (the BLAS PyTorch was built with) everywhere; on CPU in
    float32 also oneDNN's kernel (`clip_pacl.models.layers.dense`). `peak_gflop_s` is the larger. On CPU also
    `peak_gflop_per_cpu_s`: the best rate per second of this process's CPU time (per core, whatever the thread
    count), the ceiling for a model's GFLOP per CPU second on a machine that other jobs share."""
    from clip_pacl.models.layers import dense

    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    fns = {"mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and dtype == torch.float32:
        fns["onednn"] = lambda: dense(a, b, None)
    rates, per_cpu = {}, []
    with torch.inference_mode():
        for name, fn in fns.items():
            seconds, cpu_seconds = _best_seconds(fn, device, repeats, 10 if device.type == "cuda" else 1)
            rates[f"peak_{name}_gflop_s"] = round(2 * size**3 / seconds / 1e9, 1)
            per_cpu.append(round(2 * size**3 / max(cpu_seconds, 1e-9) / 1e9, 1))
    cpu_peak = {"peak_gflop_per_cpu_s": max(per_cpu)} if device.type == "cpu" else {}
    return {**rates, "peak_gflop_s": max(rates.values()), **cpu_peak, "peak_dtype": str(dtype).removeprefix("torch."),
            "peak_size": size}


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


def with_machine(record: dict) -> dict:
    """`record` with the machine's fields (`machine_info` on the CPU) added where it does not already set them."""
    return {**machine_info(), **record}


def append_jsonl(path, records) -> None:
    """Append `records` to the JSONL file `path`, each carrying where it ran (`with_machine`)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(with_machine(record)) + "\n")
