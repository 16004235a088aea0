"""What loading a model may cost: the largest model it builds and the views and byte counts a file's tensors may claim.

Every loader builds its model on the meta device first, checks its size here and compares the file's declared
tensors with it, and only then allocates. A model larger than `max_model_bytes()` is refused before anything is
allocated: the default, 16 GiB, holds every CLIP open_clip publishes in fp32 (ViT-bigG-14, the largest, is
10.2 GB); the `CLIP_PACL_MAX_MODEL_BYTES` environment variable (bytes) raises or lowers it. A file's tensors may
need no more bytes than its storages hold (no stride-0 or overlapping views that a copy would blow up), and its
storages no more bytes than the file holds (so a compressed archive cannot inflate past its own size).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch

from clip_pacl.console import human_bytes
from clip_pacl.errors import CheckpointError, ConfigError

MAX_MODEL_BYTES_ENV = "CLIP_PACL_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 16 * 2**30


def max_model_bytes() -> int:
    """The largest model (parameters and buffers, in bytes) a loader builds: `CLIP_PACL_MAX_MODEL_BYTES` or 16 GiB."""
    text = os.environ.get(MAX_MODEL_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_MODEL_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{MAX_MODEL_BYTES_ENV} must be a positive number of bytes, not '{text}'")
    return value


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_model_size(model: torch.nn.Module, source: str) -> None:
    """Refuse a model (built on the meta device, so nothing is allocated yet) larger than `max_model_bytes()`."""
    limit = max_model_bytes()
    size = tensor_bytes([*model.parameters(), *model.buffers()])
    if size > limit:
        raise CheckpointError(f"{source} declares a model of {human_bytes(size)}, over the {human_bytes(limit)} "
                              f"limit (set {MAX_MODEL_BYTES_ENV} to allow more)")


def check_tensors(state: Mapping[str, torch.Tensor], source: str, file_bytes: int | None) -> None:
    """Refuse tensors that claim more memory than their storage holds (stride-0 or overlapping views), storages
    that claim more bytes than the file (`file_bytes`, None: not checked), and more than `max_model_bytes()` in all.
    Works on meta tensors, so a file is checked before its data is read."""
    storages: dict[int, int] = {}
    for name, t in state.items():
        storage = t.untyped_storage()
        needed = t.numel() * t.element_size()
        if needed > storage.nbytes() - t.storage_offset() * t.element_size():
            kind = "a stride-0" if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)) else "an overlapping"
            raise CheckpointError(f"{source}: tensor '{name}' is {kind} view: its {human_bytes(needed)} "
                                  f"of {tuple(t.shape)} come from a storage of {human_bytes(storage.nbytes())}")
        storages[storage._cdata] = storage.nbytes()
    stored = sum(storages.values())
    if file_bytes is not None and stored > file_bytes:
        raise CheckpointError(f"{source} declares {human_bytes(stored)} of tensor data but the file holds only "
                              f"{human_bytes(file_bytes)}")
    limit, total = max_model_bytes(), tensor_bytes(state.values())
    if total > limit:
        raise CheckpointError(f"{source} holds {human_bytes(total)} of tensors, over the {human_bytes(limit)} "
                              f"limit (set {MAX_MODEL_BYTES_ENV} to allow more)")
