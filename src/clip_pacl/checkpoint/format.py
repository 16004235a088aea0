"""The file names of a clip-pacl checkpoint directory and the two primitives every writer and reader uses.

CLIP (`checkpoint/io.py`), PACL (`checkpoint/pacl.py`) and backbone (`checkpoint/backbone.py`) directories share
`config.json` (with a `model_type`) and `model.safetensors`; they all write files atomically and load state dicts
strictly, with an error that names the first mismatch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clip_pacl.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place: a crash mid-write never
    leaves a truncated checkpoint under the real name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """`model.load_state_dict(state)`, strictly: any missing, unexpected or mis-shaped tensor is a CheckpointError
    naming `source`."""
    try:
        result = model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as e:  # shape mismatches
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), first_line(e))
        raise CheckpointError(f"{source} does not match the model: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} tensors (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected tensors (e.g. {result.unexpected_keys[0]})")
        raise CheckpointError(f"{source} does not match the model: {'; '.join(parts)}")
