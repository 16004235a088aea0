"""Reading and writing weights files, the one place that decides how a file on disk becomes tensors.

Loading a file never runs code from it: a `.safetensors` file is read only by safetensors; anything else
is a torch pickle read with `torch.load(weights_only=True)`, or a TorchScript archive whose weights are
read by `torchscript.read_state` without compiling or running the archive. Writes go to a temporary file
in the same directory and are renamed into place (`clip_pacl.atomic.atomic_write`, importable from here too),
so a crash never leaves a half-written checkpoint.
Other layers (PACL heads, backbone models, training) save and load through these functions.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clip_pacl.atomic import atomic_write
from clip_pacl.errors import CheckpointError
from clip_pacl.formats import torchscript
from clip_pacl.limits import check_tensors

SAFETENSORS_SUFFIX = ".safetensors"
WEIGHTS_NAME = "model.safetensors"  # a clip-pacl checkpoint dir: these two, plus what its model type adds
CONFIG_NAME = "config.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


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


def read_weights(path: str | Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU: safetensors by name, else a TorchScript archive's weights or a
    torch pickle read with `weights_only=True`; `{"state_dict": ...}` and DDP's `module.` prefixes are unwrapped.

    The file's declared tensors are read first without their data (on the meta device) and checked (`limits.py`):
    no stride-0 or overlapping views, no more tensor data than the file holds, no more than the model size limit.
    `meta=True` returns those; otherwise the data is read only when they pass."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    specs = _read_state(path, meta=True)
    check_tensors(specs, str(path), None if path.suffix == SAFETENSORS_SUFFIX else path.stat().st_size)
    if meta:
        return specs
    state = _read_state(path, meta=False)
    check_tensors(state, str(path), None)
    return state


def _read_state(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return _safetensors_specs(path) if meta else load_file(str(path))
        if is_torchscript_file(path):
            obj = torchscript.read_state(path, meta=meta)
        else:
            obj = torch.load(path, map_location="meta" if meta else "cpu", weights_only=True)
    except torchscript.TorchScriptError as e:
        raise CheckpointError(f"{path} is a TorchScript archive clip-pacl does not read: {e}") from None
    except Exception as e:  # foreign files fail with SafetensorError, UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path} is not a checkpoint clip-pacl can read: {_why_unreadable(path, e)}") from None
    return unwrap_state_dict(obj, str(path))


def _safetensors_specs(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors, from its header (safetensors checks the header's offsets
    against the file's length)."""
    specs = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(part.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: tensor '{name}' has dtype {part.get_dtype()}, which clip-pacl does "
                                      f"not read")
            specs[name] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
    return specs


def check_state_matches(targets: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse `state` unless it has exactly the tensors of `targets` (a model's state_dict()), with the same shapes,
    and floating-point data where the model has floating-point tensors. Both may be on the meta device: this is the
    check made before any tensor data is read or any model memory allocated."""
    _check_keys([k for k in targets if k not in state], [k for k in state if k not in targets], source)
    for name, target in targets.items():
        found = state[name]
        if found.shape != target.shape:
            raise CheckpointError(f"{source} does not match the model: size mismatch for {name}: the checkpoint "
                                  f"has {tuple(found.shape)}, the model {tuple(target.shape)}")
        if found.is_floating_point() != target.is_floating_point():
            raise CheckpointError(f"{source} does not match the model: tensor '{name}' is {found.dtype}, "
                                  f"the model's is {target.dtype}")


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
    _check_keys(result.missing_keys, result.unexpected_keys, source)


def _check_keys(missing: list[str], unexpected: list[str], source: str) -> None:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if parts:
        raise CheckpointError(f"{source} does not match the model: {'; '.join(parts)}")


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Give a model built on the meta device the tensors of `state` (floating point as fp32), strictly: every
    tensor must be set, so the model is never left half on the meta device."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    load_state_into(model, state, source, assign=True)
    unset = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:  # a non-persistent buffer: no checkpoint holds it, so it must be computed in __init__ instead
        raise CheckpointError(f"{source}: the model has tensors no checkpoint sets (e.g. {unset[0]})")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
