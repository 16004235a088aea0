"""A model's architecture, size and provenance as plain data (what `clip-pacl info` prints)."""

from __future__ import annotations

from typing import Any

from torch import nn

from clip_pacl.checkpoint.io import RANDOM_FORMATS, Source, load_with_source
from clip_pacl.config import CLIPConfig
from clip_pacl.models.clip import CLIP

RANDOM_INIT = "random init (no pretrained weights)"


def summarize(src: str, *, pretrained: str | None = None, quick_gelu: bool | None = None,
              random_weights: bool | None = None) -> dict[str, Any]:
    """Load `src` (any source `clip_pacl.load` reads) and describe it."""
    model, source = load_with_source(src, pretrained=pretrained, quick_gelu=quick_gelu, random_weights=random_weights)
    return describe(model, source)


def describe(model: nn.Module, source: Source) -> dict[str, Any]:
    clip = model if isinstance(model, CLIP) else getattr(model, "clip", None)
    out: dict[str, Any] = {
        "model": type(model).__name__,
        "source": {"format": source.format, "location": source.location, "hub_id": source.hub_id},
        "weights": RANDOM_INIT if source.format in RANDOM_FORMATS else "loaded",
    }
    if isinstance(clip, CLIP):
        out["architecture"] = architecture(clip.config)
    out["parameters"] = parameter_counts(model)
    return out


def architecture(config: CLIPConfig) -> dict[str, Any]:
    v, t = config.vision, config.text
    image: dict[str, Any] = {"type": "ResNet" if v.is_resnet else "ViT", "image_size": v.image_size,
                             "width": v.width, "layers": list(v.layers) if v.is_resnet else v.layers,
                             "heads": v.heads}
    if not v.is_resnet:
        image.update(patch_size=v.patch_size, grid=v.grid_size, mlp_ratio=v.mlp_ratio)
    return {
        "name": config.name,
        "embed_dim": config.embed_dim,
        "activation": "quick_gelu" if config.quick_gelu else "gelu",
        "image_tower": image,
        "text_tower": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                       "layers": t.layers, "heads": t.heads, "mlp_ratio": t.mlp_ratio},
        "logit_bias": config.init_logit_bias is not None,
    }


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by tower: `visual.*` is the image tower, `text.*` the text tower (also inside a PACL's
    `clip.`); the rest (logit scale, PACL embedders, ...) is `other`."""
    counts = {"image_tower": 0, "text_tower": 0, "other": 0}
    for name, param in model.named_parameters():
        parts = name.split(".")
        tower = "image_tower" if "visual" in parts[:2] else "text_tower" if "text" in parts[:2] else "other"
        counts[tower] += param.numel()
    counts["total"] = sum(counts.values())
    return counts
