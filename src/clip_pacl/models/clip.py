"""CLIP: an image tower and a text tower projected into one space, with a learned temperature."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.config import CLIPConfig
from clip_pacl.models.layers import activation, fast_path_applies
from clip_pacl.models.resnet import ModifiedResNet
from clip_pacl.models.text import TextTransformer
from clip_pacl.models.vit import VisionTransformer
from clip_pacl.tokenizer import Tokenizer, get_tokenizer
from clip_pacl.transforms import image_transform


class CLIPOutput(NamedTuple):
    """What `CLIP.forward` returns: the losses' inputs, in their order (`clip_loss(*model(images, texts))`)."""

    image_features: torch.Tensor | None  # (B, D), L2-normalised
    text_features: torch.Tensor | None  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # the scale itself, a scalar: exp of the learned log-space parameter (as open_clip)
    logit_bias: torch.Tensor | None  # SigLIP only


class CLIP(nn.Module):
    """An image tower (ViT or ModifiedResNet) and a causal text tower projected into one `embed_dim` space.

    `encode_image` (B, 3, H, W) -> (B, D) and `encode_text` (B, L) ids -> (B, D); `forward` returns both normalised
    with the temperature, as the contrastive losses consume them.
    """

    model_type = "clip"
    # The objectives it trains under (`clip-pacl train --objective`), the first by default. (`--objective pacl` on a
    # CLIP trains a new PACL on it, whose `objectives` are ("pacl",).)
    objectives = ("clip", "siglip")

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

    # ------------------------------------------------------------------ precision
    @property
    def tower_dtype(self) -> torch.dtype:
        """The towers' weight dtype: float32, or bfloat16 after `set_tower_dtype` (`load(..., precision="bf16")`)."""
        return self.text.token_embedding.weight.dtype

    def set_tower_dtype(self, dtype: torch.dtype) -> CLIP:
        """Cast both towers' weights to `dtype` for inference (bfloat16 runs on the CPU's bf16 units or a GPU's).
        The encoders cast their pixels to it and return float32 features; the temperature and everything after
        the encoders stay float32. Training keeps float32 weights (autocast does the casting there)."""
        self.visual.to(dtype)
        self.text.to(dtype)
        return self

    # ------------------------------------------------------------------ encoders
    # Under no_grad in eval mode the encoders take the towers' exact inference paths (`fast=True`, see
    # `models/layers.py`); otherwise (and in `forward`) the towers' plain definitions.
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D)."""
        x = self.visual(image.to(self.tower_dtype), fast=fast_path_applies(self.visual)).float()
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids -> (B, D)."""
        x = self.text(text, fast=fast_path_applies(self.text)).float()
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image_tokens(self, image: torch.Tensor, dense: str = "tokens") -> torch.Tensor:
        """Token-level image features in the joint space (B, 1 + N, D), index 0 the pooled token.

        `dense="tokens"`: the tower's last-layer tokens (ViT: last block; ResNet: every attention-pool position as a
        query). `dense="maskclip"`: the last attention replaced by its value path, which keeps each token local."""
        if dense not in ("tokens", "maskclip"):
            raise ValueError(f"unknown dense mode '{dense}' (tokens, maskclip)")
        fast, image = fast_path_applies(self.visual), image.to(self.tower_dtype)
        if dense == "maskclip":
            return self.visual.forward_maskclip(image, fast=fast).float()
        return self.visual.forward_tokens(image, fast=fast).float()

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> CLIPOutput:
        """Normalised image (B, D) and text (B, D) features with the scale exp(logit_scale) (and the bias), by the
        plain towers: what training differentiates, in the losses' order (`clip_loss(*model(images, texts))`). The
        training loop keeps the scale at most 100 (it clamps the parameter at ln 100 after each step, as open_clip)."""
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
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def image_layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """The image tower's layer groups, input to output (`layer_groups` of the ViT or ResNet)."""
        return self.visual.layer_groups()

    def trim_text_padding(self, tokens: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """Host token ids (B, L) cut after the batch's longest text (`TextTransformer.trim_padding`): exact, since
        the text tower is causal and pools at the EOT token. The training loop calls it before a batch goes to the
        device."""
        return TextTransformer.trim_padding(tokens, multiple)

    def loss_features(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the contrastive losses consume: normalised (B, D) image and text features.

        Every trainable model (CLIP, PACL, backbone models) has this method plus `logit_scale`
        and `logit_bias`, so the training loop, accumulation and distributed gathering are shared.
        """
        out = self(images, texts)
        return out.image_features, out.text_features
