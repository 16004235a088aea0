"""The tokenizer and image transform that belong to a model.

Every model (`models.protocol.ContrastiveModel`) brings its own: CLIP and PACL the CLIP BPE tokenizer and CLIP's
transforms, a third-party backbone model its text model's tokenizer and its image model's normalisation.
Training, evaluation, the index and the server ask here, so every model is fed the inputs it was built for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clip_pacl.models.protocol import ContrastiveModel
from clip_pacl.transforms import OPENAI_MEAN, OPENAI_STD


def model_tokenizer(model: ContrastiveModel) -> Callable[[list[str]], torch.Tensor]:
    """A callable: list of texts -> (B, L) token ids, as the model's text tower expects them."""
    return model.get_tokenizer()


def model_transform(model: ContrastiveModel, train: bool = False, image_size: int | None = None) -> Callable:
    """PIL image -> (3, H, W) tensor for the model; `image_size` overrides the model's input size."""
    return model.image_transform(train, image_size)


def normalize_pixels(model: ContrastiveModel, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] (B, 3, H, W) -> the model's normalised input, differentiably (for CLIPScore on generated
    tensors and for guidance). A third-party backbone normalises with its own `data_config`; CLIP with OpenAI's."""
    config = getattr(model, "data_config", None)
    mean, std = (config["mean"], config["std"]) if config else (OPENAI_MEAN, OPENAI_STD)
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std
