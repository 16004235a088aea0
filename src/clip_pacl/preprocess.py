"""The tokenizer and image transform that belong to a model.

CLIP and PACL models use the CLIP BPE tokenizer and CLIP's transforms; a third-party backbone model
brings its own (`get_tokenizer()`, `image_transform(train)`). Training and evaluation ask here, so
every model is fed the inputs it was built for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clip_pacl.tokenizer import get_tokenizer
from clip_pacl.transforms import image_transform


def model_tokenizer(model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """A callable: list of texts -> (B, L) token ids, as the model's text tower expects them."""
    if callable(getattr(model, "get_tokenizer", None)):
        return model.get_tokenizer()
    return get_tokenizer(getattr(model, "context_length", 77))


def model_transform(model: nn.Module, train: bool = False, image_size: int | None = None) -> Callable:
    """PIL image -> (3, H, W) tensor for the model; `image_size` overrides a CLIP model's input size."""
    if callable(getattr(model, "image_transform", None)):
        return model.image_transform(train)
    return image_transform(image_size or model.image_size, train=train)
