"""Other libraries' weight formats, both directions: reading OpenAI (`convert_openai`, `torchscript`), open_clip
(`convert_open_clip`) and Hugging Face (`convert_hf`) state dicts into ours, and writing a CLIP back as Hugging Face
(`export_hf`, with `hf_processor`'s files), open_clip (`export_open_clip`) or ONNX (`export_onnx`).

A new weight format goes here: a strict two-way key table like `convert_hf`, a branch in `checkpoint.io.load`'s
dispatch to read it, and a case in `export` to write it. Names are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"export": "writers", "export_hf": "writers", "export_open_clip": "writers", "export_onnx": "onnx"}
__all__ = ["export", "export_hf", "export_onnx", "export_open_clip"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:  # a submodule (`formats.convert_hf`)
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
