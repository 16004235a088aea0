"""Training: `train(TrainConfig) -> TrainResult`, the library entry behind `clip-pacl train`.

Run it as several processes with `torchrun --nproc-per-node N -m clip_pacl_app train ARGS` (DDP).
`train`, `TrainResult` and `accumulate_gradients` are imported on first use (PEP 562), so that the CLI reads
`TrainConfig`'s defaults (`train/config.py`) without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clip_pacl.train.config import TrainConfig

if TYPE_CHECKING:
    from clip_pacl.train.loop import TrainResult, accumulate_gradients, train

__all__ = ["TrainConfig", "TrainResult", "accumulate_gradients", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "accumulate_gradients", "train"):
        value = getattr(importlib.import_module("clip_pacl.train.loop"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
