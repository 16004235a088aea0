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
from clip_pacl.transforms import OPENAI_MEAN, OPENAI_STD, image_transform


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


def normalize_pixels(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] (B, 3, H, W) -> the model's normalised input, differentiably (for CLIPScore on generated
    tensors and for guidance). A third-party backbone normalises with its own `data_config`; CLIP with OpenAI's."""
    config = getattr(model, "data_config", None)
    mean, std = (config["mean"], config["std"]) if config else (OPENAI_MEAN, OPENAI_STD)
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std
