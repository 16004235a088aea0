"""CLIP guidance: a differentiable loss that pulls images toward text prompts, for any generator's sampling loop.

This is the recipe of CLIP-guided diffusion (Crowson's notebooks, disco-diffusion): score many random cutouts of
each image rather than the image itself (crops of random size resized to the model's input, random flips, a
little noise), so the gradient cannot be satisfied by an adversarial pattern at one scale and position; measure
each cutout by the squared spherical distance to the prompt embedding, averaged over cutouts.

    guidance = CLIPGuidance(clip_pacl.load("runs/clip"), ["a red circle"], cutouts=16)
    for t in sampler:                        # any generator: diffusion, a GAN's latent, raw pixels
        x = ...                              # (B, 3, H, W) in [0, 1], a function of what you optimise
        loss = guidance(x)                   # a scalar
        loss.backward()  # or guidance.grad(x) for the gradient with respect to the image itself
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.encode import encode_texts
from clip_pacl.errors import ConfigError
from clip_pacl.preprocess import normalize_pixels


def spherical_distance_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between L2-normalised vectors (..., D): 2 * arcsin(|x - y| / 2)^2.

    Unlike 1 - cos it does not flatten near the target, so the pull stays strong until the image gets there."""
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


class CLIPGuidance(nn.Module):
    """Loss (a scalar) of images in [0, 1] (B, 3, H, W) against `prompts`; lower means closer to the prompts.

    `weights` weigh the prompts (a negative weight pushes away from one). The model is not trained: its
    parameters are left as they are, and only the images receive gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: str | Sequence[str],
        cutouts: int = 16,
        *,
        weights: Sequence[float] | None = None,
        cut_power: float = 1.0,
        min_cut: float = 0.25,
        flip: bool = True,
        noise: float = 0.05,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ConfigError("CLIP guidance needs at least one prompt")
        if cutouts < 1:
            raise ConfigError(f"cutouts must be at least 1, got {cutouts}")
        if not 0 < min_cut <= 1:
            raise ConfigError(f"min_cut is a fraction of the image side in (0, 1], got {min_cut}")
        weights = [1.0] * len(prompts) if weights is None else list(weights)
        if len(weights) != len(prompts) or sum(abs(w) for w in weights) == 0:
            raise ConfigError(f"{len(prompts)} prompts need as many weights, not all zero (got {weights})")
        if getattr(model, "vision_frozen", False):  # PACL computes its frozen CLIP's patch tokens without a graph
            raise ConfigError(f"{type(model).__name__}'s image embedding passes no gradient to the pixels (its image "
                              "tower is frozen); guide with its CLIP: CLIPGuidance(model.clip, ...)")
        self.model = model.eval()
        self.prompts = prompts
        self.cutouts, self.cut_power, self.min_cut, self.flip, self.noise = cutouts, cut_power, min_cut, flip, noise
        self.generator = generator
        self.register_buffer("text_features", encode_texts(model, prompts), persistent=False)  # (P, D)
        self.register_buffer("weights", torch.tensor(weights) / sum(abs(w) for w in weights), persistent=False)

    def make_cutouts(self, images: torch.Tensor) -> torch.Tensor:
        """(cutouts * B, 3, S, S) random crops of `images` (B, 3, H, W), cutout-major, resized to the model's size.

        Crop sides are drawn as min + u^cut_power * (max - min): cut_power > 1 favours small, detailed crops."""
        size = self.model.image_size
        _, _, height, width = images.shape
        max_side = min(height, width)
        min_side = max(1, min(max_side, round(self.min_cut * max_side)))
        rand = lambda *shape: torch.rand(*shape, generator=self.generator)  # noqa: E731 - one seeded source
        crops = []
        for _ in range(self.cutouts):
            side = int(min_side + float(rand(())) ** self.cut_power * (max_side - min_side))
            top = int(rand(()) * (height - side + 1))
            left = int(rand(()) * (width - side + 1))
            crop = images[:, :, top:top + side, left:left + side]  # (B, 3, side, side)
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            if self.flip and float(rand(())) < 0.5:
                crop = crop.flip(-1)
            crops.append(crop)
        out = torch.cat(crops)  # (cutouts * B, 3, S, S)
        if self.noise > 0:  # per-cutout strength, as the notebooks do
            scale = rand(len(out), 1, 1, 1).to(out) * self.noise
            out = out + scale * torch.randn(out.shape, generator=self.generator).to(out)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        batch = images.shape[0]
        features = self.model.encode_image(normalize_pixels(self.model, self.make_cutouts(images)), normalize=True)
        features = features.view(self.cutouts, batch, 1, -1)  # (cutouts, B, 1, D)
        distances = spherical_distance_loss(features, self.text_features.to(features))  # (cutouts, B, P)
        return (distances.mean(dim=0) * self.weights.to(distances)).sum(dim=-1).mean()  # per image, then the batch

    def grad(self, images: torch.Tensor) -> torch.Tensor:
        """d loss / d images (B, 3, H, W): what a sampler adds (scaled) to its update."""
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            return torch.autograd.grad(self(x), x)[0]

    @torch.no_grad()
    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine (B, P) of the whole images (resized, no augmentation) to each prompt: a progress measure."""
        size = self.model.image_size
        resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        features = self.model.encode_image(normalize_pixels(self.model, resized), normalize=True)
        return features @ self.text_features.to(features).T

    def optimize_pixels(self, pixels: torch.Tensor, steps: int, lr: float = 0.05) -> torch.Tensor:
        """The simplest generator: Adam on the pixels themselves (B, 3, H, W) in [0, 1], clamped after each step;
        returns the guided pixels (a new tensor; `pixels` is not changed)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        pixels = pixels.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([pixels], lr=lr)
        for _ in range(steps):
            loss = self(pixels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                pixels.clamp_(0, 1)
        return pixels.detach()
