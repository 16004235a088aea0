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
