"""The weights of a TorchScript archive (OpenAI's released CLIP `.pt` files), read without running anything in it.

`torch.jit.load` compiles the archive's `code/` and calls the `__setstate__` methods it defines, so loading a
TorchScript file can run code. The weights need none of that: `<archive>/data.pkl` is a pickle of the module
tree, `__torch__.*` module objects whose attributes are tensors (their bytes in `<archive>/data/<key>`),
submodules and plain values. We unpickle it with an unpickler that can build only tensors, stand-ins for the
module objects that record their state and run no code, and the few list helpers TorchScript's pickler emits;
any other global is refused. The state dict is then read off the module tree, with the keys
`module.state_dict()` would give (every tensor attribute, named by its path).
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch

# The storage classes a tensor can name in a pickle, and the dtype of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
# TorchScript's pickler wraps typed lists and containers in these; their plain values are all we need.
CHUNK_BYTES = 1 << 20  # storages are inflated this much at a time
_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_strlist")


class TorchScriptError(pickle.UnpicklingError):
    """The archive is not plain module weights (it needs code, or names something other than tensors)."""


class _Storage(NamedTuple):
    key: str
    dtype: torch.dtype
    numel: int


class _TensorRef(NamedTuple):
    """A tensor as the pickle describes it; materialised only after unpickling, with bounds checked.
    (A tuple has no `__dict__` or `__setstate__`, so a pickle's BUILD cannot act on it.)"""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class ScriptObject:
    """Stands in for one of the archive's classes (`__torch__.X`): keeps the pickled state, runs none of its code."""

    __slots__ = ("state",)
    type_name = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _int_tuple(xs: Any) -> bool:
    return isinstance(xs, tuple) and all(type(x) is int for x in xs)


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    """What `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` stands for."""
    if not (isinstance(storage, _Storage) and type(offset) is int and _int_tuple(size) and _int_tuple(stride)):
        raise TorchScriptError("a tensor in the archive is malformed")
    return _TensorRef(storage, offset, size, stride)


def _restore_type_tag(value: Any, _type: Any) -> Any:
    return value


class _WeightsUnpickler(pickle.Unpickler):
    """Builds tensors (as `_TensorRef`s), `OrderedDict`s and `ScriptObject`s; refuses every other global."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}
        self._classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_ref
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _restore_type_tag
        if module == "__torch__" or module.startswith("__torch__."):
            type_name = f"{module}.{name}"
            if type_name not in self._classes:
                self._classes[type_name] = type(name, (ScriptObject,), {"__slots__": (), "type_name": type_name})
            return self._classes[type_name]
        raise TorchScriptError(f"it names '{module}.{name}', which is not part of a module's weights")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise TorchScriptError("a tensor in the archive refers to storage in an unknown way")
        storage = _Storage(pid[2], pid[1], pid[4])
        if self.storages.setdefault(storage.key, storage) != storage:
            raise TorchScriptError(f"storage '{storage.key}' is declared twice with different types or sizes")
        return storage


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive is a zip with compiled code (`code/`, `constants.pkl`); `torch.save` zips have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state(path: str | Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of the module saved in a TorchScript archive; raises TorchScriptError for anything else.
    `meta`: tensors on the meta device (shapes, dtypes and views as declared; no tensor data is read)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchScriptError("it has no single <name>/data.pkl holding a module")
        prefix = pickles[0].removesuffix("data.pkl")
        if f"{prefix}byteorder" in names and _read_entry(archive, f"{prefix}byteorder", 16) != sys.byteorder.encode():
            raise TorchScriptError("its tensors are stored in the other byte order")
        unpickler = _WeightsUnpickler(_read_entry(archive, pickles[0], os.path.getsize(path)))
        root = unpickler.load()
        flat = {key: _read_storage(archive, f"{prefix}data/{key}", storage, meta)
                for key, storage in unpickler.storages.items()}
    refs: dict[str, _TensorRef] = {}
    _collect(root, "", refs)
    if not refs:
        raise TorchScriptError("its module holds no tensors")
    return {name: _materialise(ref, flat[ref.storage.key]) for name, ref in refs.items()}


def _collect(obj: Any, prefix: str, out: dict[str, _TensorRef]) -> None:
    """Every tensor attribute of the module tree under `obj`, by dotted path (state_dict's names)."""
    where = f"'{prefix.rstrip('.')}'" if prefix else "its root"
    if not isinstance(obj, ScriptObject):
        raise TorchScriptError(f"{where} is a {type(obj).__name__}, not a TorchScript module")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise TorchScriptError(f"{where} is a {obj.type_name} with custom state, which needs the archive's code to "
                               "rebuild; only plain modules' weights are read")
    for name, value in state.items():
        if isinstance(value, _TensorRef):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def _read_storage(archive: zipfile.ZipFile, entry: str, storage: _Storage, meta: bool) -> torch.Tensor:
    """The elements of one storage, as a flat tensor; its size in the zip must match what the pickle declares.
    The entry is inflated in chunks into a buffer of the declared size, never past it."""
    nbytes = storage.numel * storage.dtype.itemsize
    try:
        info = archive.getinfo(entry)
    except KeyError:
        raise TorchScriptError(f"it lacks the tensor data {entry}") from None
    if info.file_size != nbytes:
        raise TorchScriptError(f"{entry} holds {info.file_size} bytes, not the {nbytes} its tensors need")
    if meta or nbytes == 0:
        return torch.empty(storage.numel, dtype=storage.dtype, device="meta" if meta else "cpu")
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    with archive.open(info) as f:
        while done < nbytes and (n := f.readinto(view[done:done + CHUNK_BYTES])):
            done += n
        if done != nbytes or f.read(1):
            raise TorchScriptError(f"{entry} does not hold the {nbytes} bytes it declares")
    return buffer.view(storage.dtype)


def _read_entry(archive: zipfile.ZipFile, entry: str, limit: int) -> bytes:
    """A small entry (the pickle, the byte order), refused when it inflates past `limit` bytes."""
    with archive.open(entry) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TorchScriptError(f"{entry} inflates to more than {limit} bytes")
    return data


def _materialise(ref: _TensorRef, flat: torch.Tensor) -> torch.Tensor:
    """The tensor viewing `flat`, refused when it reaches outside the storage (checked here as well as by
    `as_strided`, which does not check meta tensors)."""
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if ref.offset < 0 or any(s < 0 for s in ref.stride) or (all(ref.size) and last >= flat.numel()):
        raise TorchScriptError(f"a tensor does not fit its storage (a view of {ref.size} at offset {ref.offset} "
                               f"needs more than its {flat.numel()} elements)")
    try:
        return flat.as_strided(ref.size, ref.stride, ref.offset)
    except RuntimeError as e:
        raise TorchScriptError(f"a tensor does not fit its storage ({str(e).splitlines()[0]})") from None
