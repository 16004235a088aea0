"""What every contrastive model here offers (CLIP, PACL, BackboneCLIP), so training, evaluation, zero-shot,
the index and the server are written once against this instead of against `hasattr` checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ContrastiveModel(Protocol):
    """An image encoder and a text encoder into one space, a learned temperature, and their own preprocessing."""

    model_type: str  # "clip" | "pacl" | "backbone": config.json's model_type, which picks the checkpoint writer
    objectives: tuple[str, ...]  # the objectives it trains under (`clip-pacl train --objective`), the first default
    logit_scale: nn.Parameter  # log of the temperature's inverse: the losses take its exp (what `forward` returns)
    logit_bias: nn.Parameter | None  # SigLIP's learned bias, else None

    @property
    def image_size(self) -> int:
        """Side of the square input images."""

    @property
    def context_length(self) -> int:
        """Token ids per text."""

    @property
    def embed_dim(self) -> int:
        """Width D of the joint space."""

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, D)."""

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids from `get_tokenizer()` -> (B, D)."""

    def similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B, C) scores of images against normalised text features (C, D) (cosine; PACL: its compatibility)."""

    def loss_features(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image side, text side) of a batch, as the model's contrastive loss consumes them."""

    def trim_text_padding(self, tokens: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """Host token ids (B, L) as the training loop may send them: cut after the longest text where that is exact
        (a causal tower pooled at EOT), else unchanged."""

    def get_tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        """texts -> (B, context_length) token ids, as the text tower expects them."""

    def image_transform(self, train: bool = False, image_size: int | None = None) -> Callable:
        """PIL image -> (3, S, S) tensor: the eval preprocess, or the training augmentation."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory."""


@runtime_checkable
class PatchScorer(Protocol):
    """A model that scores every patch against class texts (PACL): what text-driven segmentation upsamples."""

    @property
    def patch_stride(self) -> int:
        """Pixels per patch along each side."""

    def patch_similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels and (C, D) normalised class features -> (B, C, H / stride, W / stride) scores."""
