"""Choosing a torch device from a user's `--device` value."""

from __future__ import annotations

import torch

from clip_pacl.errors import ConfigError


def resolve_device(name: str | None) -> torch.device:
    """`None`: CUDA when available, else CPU; otherwise the named device, which must exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but CUDA is not available")
    return device
