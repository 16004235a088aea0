"""Weights in and out in clip-pacl's own format, and every source `load` takes (our directories, run directories,
the hub, and other libraries' files through `clip_pacl.formats`).

`export`, `export_hf` and `export_open_clip` live in `clip_pacl.formats`; they are still importable from here
(their old home), on first use.
"""

from __future__ import annotations

from typing import Any

from clip_pacl.checkpoint.files import read_weights
from clip_pacl.checkpoint.io import Source, load, load_with_source, save

__all__ = ["Source", "export", "export_hf", "export_open_clip", "load", "load_with_source", "read_weights", "save"]


def __getattr__(name: str) -> Any:
    if name in ("export", "export_hf", "export_open_clip"):
        from clip_pacl.formats import writers

        return getattr(writers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
