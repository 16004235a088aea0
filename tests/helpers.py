"""Shared test helpers: weights that make parity tests able to fail, and reference imports that CI cannot skip."""

from __future__ import annotations

import importlib
import json
import os
from importlib import resources
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.tokenizer import tokenize

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every floating parameter and persistent buffer of `module` in place with seeded random values.

    Fresh models have zero biases, identity LayerNorms and 0/1 BatchNorm statistics, so a converter that swaps
    two biases or two norms still matches its reference. Here nothing is left at a value it shares with another
    tensor: norm gains 1 + 0.1 N(0, 1), norm biases and running means 0.1 N(0, 1), running variances U(0.5, 2),
    other vectors (biases, class token) 0.1 N(0, 1), matrices N(0, 1/fan_in) so activations keep their scale
    through the depth, scalars (logit scale and bias) their value + 0.1 N(0, 1) so the logits stay in range.
    Conv kernels get 1.1x that std: eval-mode BatchNorm with random statistics does not renormalise, so with
    plain 1/fan_in each ReLU halves the image's signal and RN50's output all but forgets its input (the pooled
    embeddings of two noise images differ by 7% of their spread; with 1.1x by 13%, at output scale about 1;
    1.2x would double that but reach scale 3, where fp32 rounding alone passes 1e-5).
    Non-persistent buffers (open_clip's causal mask) are derived, not weights, and are left alone.
    The same seed on the same architecture gives the same values. Returns `module`.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen)

    for mod in module.modules():
        skip = mod._non_persistent_buffers_set
        tensors = [*mod.named_parameters(recurse=False), *((n, b) for n, b in mod.named_buffers(recurse=False)
                                                           if n not in skip)]
        for name, t in tensors:
            if not t.is_floating_point():
                continue
            if isinstance(mod, NORMS) and name == "weight":
                value = 1 + 0.1 * normal(t)
            elif name == "running_var":
                value = 0.5 + 1.5 * torch.rand(t.shape, generator=gen)
            elif t.ndim == 0:
                value = t.float().cpu() + 0.1 * normal(t)
            elif t.ndim == 1:
                value = 0.1 * normal(t)
            else:
                gain = 1.1 if t.ndim > 2 else 1.0  # conv kernels: see the docstring
                value = normal(t) * gain * t[0].numel() ** -0.5
            t.copy_(value)
    return module


def preset_dict(name: str) -> dict:
    """One of our presets as an open_clip model config ({"embed_dim", "vision_cfg", "text_cfg"})."""
    return json.loads(resources.files("clip_pacl.presets").joinpath(f"{name}.json").read_text())


def require(name: str) -> ModuleType:
    """Import the reference library `name`; skip the calling test module without it, but fail in CI.

    A module-level importorskip lets CI go green with the parity tests never run; CI sets CI=true.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (reference for parity tests) but cannot be imported: {exc}",
                        pytrace=False)
        pytest.skip(f"{name} is not installed: {exc}", allow_module_level=True)


def require_program(what: str, path: str | None, install: str) -> str:
    """`path`, the caller's find of the program `what`; without one skip the calling test module, but fail in CI
    (which installs it with `install`)."""
    if path:
        return path
    message = f"{what} is not installed (install it with `{install}`)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI requires it", pytrace=False)
    pytest.skip(message, allow_module_level=True)


CAPTIONS = ["a photo of a cat", "a diagram of two dogs playing in the long grass near a river at sunset"]


def fixed_images(image_size: int, n: int = 2) -> torch.Tensor:
    """Fixed random images, (n, 3, S, S)."""
    return torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))


def _max_diff(pairs) -> float:
    return max(float((a - b).abs().max()) for a, b in pairs)


def _clip_outputs(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> list[torch.Tensor]:
    image_n, text_n = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return [image, text, image_n, text_n, logit_scale.exp() * image_n @ text_n.T]


@torch.no_grad()
def open_clip_diff(reference: nn.Module, ours: nn.Module, image_size: int) -> float:
    """Largest difference between an open_clip-style model (`encode_image`, `encode_text`, `logit_scale`: open_clip
    and ours) and ours over raw and normalised image/text features and logits."""
    reference.eval(), ours.eval()
    images, texts = fixed_images(image_size), tokenize(CAPTIONS)
    ref = _clip_outputs(reference.encode_image(images), reference.encode_text(texts), reference.logit_scale)
    got = _clip_outputs(ours.encode_image(images), ours.encode_text(texts), ours.logit_scale)
    return _max_diff(zip(ref, got))


@torch.no_grad()
def hf_diff(hf_model: nn.Module, ours: nn.Module, image_size: int) -> float:
    """The same comparison against a `transformers.CLIPModel`, whose logits come from its own forward()."""
    hf_model.eval(), ours.eval()
    images, texts = fixed_images(image_size), tokenize(CAPTIONS)

    def features(output) -> torch.Tensor:  # transformers 5 returns a ModelOutput, 4.x the tensor
        return output.pooler_output if hasattr(output, "pooler_output") else output

    ref = _clip_outputs(features(hf_model.get_image_features(pixel_values=images)),
                        features(hf_model.get_text_features(input_ids=texts)), hf_model.logit_scale)
    ref[-1] = hf_model(input_ids=texts, pixel_values=images).logits_per_image
    got = _clip_outputs(ours.encode_image(images), ours.encode_text(texts), ours.logit_scale)
    return _max_diff(zip(ref, got))
