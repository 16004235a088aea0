"""Reading and writing weights files, the one place that decides how a file on disk becomes tensors.

Loading a file never runs code from it: a `.safetensors` file is read only by safetensors; anything else
is a torch pickle read with `torch.load(weights_only=True)`, or a TorchScript archive whose weights are
read by `torchscript.read_state` without compiling or running the archive. Writes go to a temporary file
in the same directory and are renamed into place, so a crash never leaves a half-written checkpoint.
Other layers (PACL heads, backbone models, training) save and load through these functions.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clip_pacl.checkpoint import torchscript
from clip_pacl.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
WEIGHTS_NAME = "model.safetensors"  # a clip-pacl checkpoint dir: these two, plus what its model type adds
CONFIG_NAME = "config.json"


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path` (an atomic replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `state` as safetensors, atomically; tensors are detached, made contiguous and moved to the CPU."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def save_json(data: Any, path: str | Path) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def is_torchscript_file(path: str | Path) -> bool:
    """Whether `read_weights` reads `path` as a TorchScript archive (never a file named `.safetensors`)."""
    return Path(path).suffix != SAFETENSORS_SUFFIX and torchscript.is_torchscript(path)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU: safetensors by name, else a TorchScript archive's weights or a
    torch pickle read with `weights_only=True`; `{"state_dict": ...}` and DDP's `module.` prefixes are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return load_file(str(path))
        if is_torchscript_file(path):
            obj = torchscript.read_state(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except torchscript.TorchScriptError as e:
        raise CheckpointError(f"{path} is a TorchScript archive clip-pacl does not read: {e}") from None
    except Exception as e:  # foreign files fail with SafetensorError, UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path} is not a checkpoint clip-pacl can read: {_why_unreadable(path, e)}") from None
    return unwrap_state_dict(obj, str(path))


def _why_unreadable(path: Path, e: Exception) -> str:
    if path.suffix == SAFETENSORS_SUFFIX:
        return f"not a valid safetensors file ({first_line(e)})"
    refused = re.search(r"GLOBAL (\S+) ", str(e)) if isinstance(e, pickle.UnpicklingError) else None
    if refused:  # torch's weights_only unpickler names the global it would not import
        return f"it holds Python objects other than tensors ({refused.group(1)}), and unpickling them could run code"
    if not zipfile.is_zipfile(path):
        return "not a safetensors, PyTorch or TorchScript file"
    if str(e).startswith("Weights only load failed"):  # its advice (weights_only=False) is not ours to give
        return "torch.load(weights_only=True) refuses what its pickle holds"
    return first_line(e)


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: unwrap `{"state_dict": ...}` and DDP's `module.` prefixes."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} is not a checkpoint clip-pacl can read: it holds no state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """`model.load_state_dict(state)`, strictly, with a one-line CheckpointError naming `source` on a mismatch."""
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


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
