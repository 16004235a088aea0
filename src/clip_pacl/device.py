"""Choosing a torch device from a user's `--device` value."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clip_pacl.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | None) -> torch.device:
    """`None`: CUDA when available, else CPU; otherwise the named device, which must exist."""
    import torch  # here: the CLI imports this module to build its parser, which needs no torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but CUDA is not available")
    return device


# ---------------------------------------------------------------------------------------------- precision
PRECISIONS = ("fp32", "bf16", "auto")
# The CPU features that give bfloat16 matrix products their own instructions: AMX tiles (Intel Sapphire Rapids and
# later) or AVX-512 BF16 (Intel Cooper Lake, AMD Zen 4 and later). Without them oneDNN emulates bfloat16 through
# float32 conversions, which is slower than plain float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (`/proc/cpuinfo`); empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices natively (AMX or AVX-512 BF16): the documented rule for
    `--precision auto` on the CPU. Read from the CPU's flags, or from PyTorch's own probe off Linux."""
    flags = cpu_flags()
    if flags:
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    import torch

    probe = getattr(torch, "cpu", None)
    return bool(probe and (getattr(probe, "_is_amx_tile_supported", lambda: False)()
                           or getattr(probe, "_is_avx512_bf16_supported", lambda: False)()))


def resolve_precision(name: str | None, device: torch.device | str = "cpu") -> str:
    """`fp32`, `bf16` or `auto` (None = fp32) as the precision that will run on `device`: `auto` is bf16 on a CPU
    with native bfloat16 matrix units (`cpu_has_fast_bf16`) or on a CUDA GPU that supports bfloat16, else fp32.
    An explicit bf16 runs wherever PyTorch supports it, slowly on CPUs without those units."""
    import torch

    name = name or "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    device = torch.device(device)
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: the GPU {torch.cuda.get_device_name(device)} does not support bfloat16")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def precision_dtype(name: str) -> torch.dtype:
    """The weights' dtype for a resolved precision (`resolve_precision`'s answer)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
