"""CLIP: an image tower and a text tower projected into one space, with a learned temperature."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.config import CLIPConfig
from clip_pacl.models import inference
from clip_pacl.models.layers import activation
from clip_pacl.models.resnet import ModifiedResNet
from clip_pacl.models.text import TextTransformer
from clip_pacl.models.vit import VisionTransformer
from clip_pacl.tokenizer import Tokenizer, get_tokenizer
from clip_pacl.transforms import image_transform


class CLIPOutput(NamedTuple):
    """What `CLIP.forward` returns: the losses' inputs."""

    image_features: torch.Tensor | None  # (B, D), L2-normalised
    text_features: torch.Tensor | None  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # exp of the learned log-scale, a scalar
    logit_bias: torch.Tensor | None  # SigLIP only


class CLIP(nn.Module):
    """An image tower (ViT or ModifiedResNet) and a causal text tower projected into one `embed_dim` space.

    `encode_image` (B, 3, H, W) -> (B, D) and `encode_text` (B, L) ids -> (B, D); `forward` returns both normalised
    with the temperature, as the contrastive losses consume them.
    """

    model_type = "clip"

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        act = activation(config.quick_gelu)
        if config.vision.is_resnet:
            self.visual: nn.Module = ModifiedResNet(config.vision, config.embed_dim)
        else:
            self.visual = VisionTransformer(config.vision, config.embed_dim, act)
        self.text = TextTransformer(config.text, config.embed_dim, act)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.init_logit_bias is not None:
            self.logit_bias: nn.Parameter | None = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        else:
            self.logit_bias = None

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        """Side of the square input images the model was built for."""
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        """Token ids per text."""
        return self.config.text.context_length

    @property
    def embed_dim(self) -> int:
        """Width D of the joint space."""
        return self.config.embed_dim

    @property
    def patch_stride(self) -> int:
        """Pixels per patch token along each side (ViT: patch size; ResNet: 32)."""
        return self.config.vision.stride

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (gh, gw) grid of patch tokens an image of this size gives (`encode_image_tokens` has 1 + gh * gw)."""
        return height // self.patch_stride, width // self.patch_stride

    # ------------------------------------------------------------------ preprocessing
    def get_tokenizer(self) -> Tokenizer:
        """CLIP's BPE tokenizer: texts -> (B, context_length) token ids."""
        return get_tokenizer(self.context_length)

    def image_transform(self, train: bool = False, image_size: int | None = None) -> Callable:
        """CLIP's preprocess (or training augmentation) at `image_size` (default: the model's)."""
        return image_transform(image_size or self.image_size, train=train)

    # ------------------------------------------------------------------ encoders
    # Under no_grad in eval mode the encoders take the exact speedups of `models/inference.py`; otherwise (and in
    # `forward`) the towers' plain definitions.
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D)."""
        fast = inference.fast_path_applies(self.visual)
        x = inference.encode_image(self.visual, image) if fast else self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids -> (B, D)."""
        x = inference.encode_text(self.text, text) if inference.fast_path_applies(self.text) else self.text(text)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image_tokens(self, image: torch.Tensor, dense: str = "tokens") -> torch.Tensor:
        """Token-level image features in the joint space (B, 1 + N, D), index 0 the pooled token.

        `dense="tokens"`: the tower's last-layer tokens (ViT: last block; ResNet: every attention-pool position as a
        query). `dense="maskclip"`: the last attention replaced by its value path, which keeps each token local."""
        if dense not in ("tokens", "maskclip"):
            raise ValueError(f"unknown dense mode '{dense}' (tokens, maskclip)")
        if inference.fast_path_applies(self.visual):
            return inference.image_tokens(self.visual, image, dense)
        return self.visual.forward_maskclip(image) if dense == "maskclip" else self.visual.forward_tokens(image)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> CLIPOutput:
        """Normalised image (B, D) and text (B, D) features with exp(logit_scale) (and the bias), by the plain
        towers: what training differentiates."""
        image_features = F.normalize(self.visual(image), dim=-1) if image is not None else None
        text_features = F.normalize(self.text(text), dim=-1) if text is not None else None
        return CLIPOutput(image_features, text_features, self.logit_scale.exp(), self.logit_bias)

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (Bi, Bt), logits_per_text (Bt, Bi)), as CLIP computes them."""
        out = self(image, text)
        logits = out.logit_scale * out.image_features @ out.text_features.T
        if out.logit_bias is not None:
            logits = logits + out.logit_bias
        return logits, logits.T

    def similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, C) of images to normalised text features (C, D), e.g. a zero-shot classifier.

        PACL (not a subclass) has its own `similarity`, its patch-aligned compatibility, with the same signature
        (`models/protocol.py`, `ContrastiveModel`), so zero-shot code serves both.
        """
        return self.encode_image(images, normalize=True) @ text_features.T

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's (stage's) activations in the backward pass to save memory."""
        for tower in (self.visual, self.text):
            target = getattr(tower, "transformer", tower)
            target.grad_checkpointing = enable

    def loss_features(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the contrastive losses consume: normalised (B, D) image and text features.

        Every trainable model (CLIP, PACL, backbone models) has this method plus `logit_scale`
        and `logit_bias`, so the training loop, accumulation and distributed gathering are shared.
        """
        out = self(images, texts)
        return out.image_features, out.text_features
