"""clip-pacl: CLIP training, conversion, evaluation and serving, with PACL open-vocabulary segmentation.

The names below are imported on first use (PEP 562), so that `import clip_pacl_app.cli.main` and the other light
modules (`errors`, `console`, `train.config`) do not load torch: `clip-pacl --help` starts at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "load": "clip_pacl.checkpoint", "save": "clip_pacl.checkpoint",
    "CLIPConfig": "clip_pacl.config", "TextConfig": "clip_pacl.config", "VisionConfig": "clip_pacl.config",
    "CLIP": "clip_pacl.models", "PACL": "clip_pacl.models.pacl", "PACLConfig": "clip_pacl.models.pacl",
    "quantize_int8": "clip_pacl.models.quantize",
    "get_tokenizer": "clip_pacl.tokenizer", "tokenize": "clip_pacl.tokenizer",
    "image_transform": "clip_pacl.transforms",
}
__all__ = [
    "CLIP", "PACL", "CLIPConfig", "PACLConfig", "TextConfig", "VisionConfig",
    "get_tokenizer", "image_transform", "load", "quantize_int8", "save", "tokenize",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from clip_pacl.checkpoint import load, save
    from clip_pacl.config import CLIPConfig, TextConfig, VisionConfig
    from clip_pacl.models import CLIP
    from clip_pacl.models.pacl import PACL, PACLConfig
    from clip_pacl.models.quantize import quantize_int8
    from clip_pacl.tokenizer import get_tokenizer, tokenize
    from clip_pacl.transforms import image_transform


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:  # a submodule used as an attribute (`clip_pacl.checkpoint.x` after `import clip_pacl`)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
