"""Model configurations as frozen dataclasses.

Configs are values: they are saved as JSON next to the weights (`config.json`) and can be
read from (and written to) open_clip's model-config format, so architectures stay data.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from typing import Any

from clip_pacl.errors import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. `layers` as an int means a ViT; a 4-tuple means OpenAI's ModifiedResNet."""

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16

    @property
    def is_resnet(self) -> bool:
        """True for OpenAI's ModifiedResNet (layers per stage), False for a ViT."""
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        """Attention heads (open_clip's convention: the RN attention pool has width*32 channels, a ViT width)."""
        return self.width * 32 // self.head_width if self.is_resnet else self.width // self.head_width

    @property
    def stride(self) -> int:
        """Pixels per patch token along each side: the ViT's patch size, the ResNet's total stride (32)."""
        return 32 if self.is_resnet else self.patch_size

    @property
    def grid_size(self) -> int:
        """Patch tokens per side at `image_size`."""
        return self.image_size // self.stride


@dataclass(frozen=True)
class TextConfig:
    """Causal text transformer, pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class CLIPConfig:
    """A CLIP architecture: joint width, the two towers, activation, initial temperature (and SigLIP bias)."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    name: str | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> CLIPConfig:
        """A preset by its open_clip name (`ViT-B-32`, `RN50`, `tiny`, ...).

        A `-quickgelu` suffix selects QuickGELU, as in open_clip.
        """
        base, quick = (name[: -len("-quickgelu")], True) if name.endswith("-quickgelu") else (name, None)
        presets = available_presets()
        if base not in presets:
            raise ConfigError(f"unknown preset '{name}' (known: {', '.join(sorted(presets))})")
        data = json.loads(resources.files("clip_pacl.presets").joinpath(f"{base}.json").read_text())
        cfg = cls.from_open_clip_dict(data, name=name)
        if quick is not None:
            cfg = replace(cfg, quick_gelu=quick)
        return replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def from_open_clip_dict(cls, data: dict[str, Any], name: str | None = None) -> CLIPConfig:
        """Parse open_clip's model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`)."""
        try:
            embed_dim = int(data["embed_dim"])
            vcfg = dict(data["vision_cfg"])
            tcfg = dict(data["text_cfg"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"not an open_clip model config: missing {e}") from None
        unsupported = [k for k in ("timm_model_name", "hf_model_name") if vcfg.get(k) or tcfg.get(k)]
        if unsupported:
            raise ConfigError(
                f"config uses third-party towers ({', '.join(unsupported)}); use a backbone: model instead"
            )
        layers = vcfg.get("layers", 12)
        if isinstance(layers, (list, tuple)):
            layers = tuple(int(x) for x in layers)
        vision = VisionConfig(
            image_size=_as_int(vcfg.get("image_size", 224)),
            layers=layers,
            width=int(vcfg.get("width", 768)),
            head_width=int(vcfg.get("head_width", 64)),
            mlp_ratio=float(vcfg.get("mlp_ratio", 4.0)),
            patch_size=_as_int(vcfg.get("patch_size", 16)),
        )
        text = TextConfig(
            context_length=int(tcfg.get("context_length", 77)),
            vocab_size=int(tcfg.get("vocab_size", 49408)),
            width=int(tcfg.get("width", 512)),
            heads=int(tcfg.get("heads", 8)),
            layers=int(tcfg.get("layers", 12)),
            mlp_ratio=float(tcfg.get("mlp_ratio", 4.0)),
        )
        kwargs: dict[str, Any] = {"embed_dim": embed_dim, "vision": vision, "text": text, "name": name}
        kwargs["quick_gelu"] = bool(data.get("quick_gelu", False))
        if data.get("init_logit_scale") is not None:
            kwargs["init_logit_scale"] = float(data["init_logit_scale"])
        if data.get("init_logit_bias") is not None:
            kwargs["init_logit_bias"] = float(data["init_logit_bias"])
        return cls(**kwargs)

    def to_open_clip_dict(self) -> dict[str, Any]:
        """open_clip's model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`)."""
        v, t = self.vision, self.text
        vision_cfg: dict[str, Any] = {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers,
                                      "width": v.width, "head_width": v.head_width}
        if not v.is_resnet:
            vision_cfg.update(patch_size=v.patch_size, mlp_ratio=v.mlp_ratio)
        out: dict[str, Any] = {
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": vision_cfg,
            "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                         "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
        }
        if self.init_logit_bias is not None:
            out["init_logit_bias"] = self.init_logit_bias
        return out

    # ------------------------------------------------------------------ our own JSON
    def to_dict(self) -> dict[str, Any]:
        """Our config.json fields (nested `vision` and `text`)."""
        d = asdict(self)
        if self.vision.is_resnet:
            d["vision"]["layers"] = list(self.vision.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """Inverse of `to_dict` (unknown top-level keys, such as `model_type`, are ignored)."""
        d = dict(d)
        try:
            vision = dict(d.pop("vision"))
            text = dict(d.pop("text"))
        except KeyError as e:
            raise ConfigError(f"config.json is missing {e}") from None
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        known = {f.name for f in fields(cls)}
        return cls(vision=VisionConfig(**vision), text=TextConfig(**text), **{k: v for k, v in d.items() if k in known})

def _as_int(x: Any) -> int:
    # open_clip allows (h, w) tuples for image_size / patch_size; we support square only.
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ConfigError(f"non-square sizes are not supported: {x}")
        x = x[0]
    return int(x)


def available_presets() -> list[str]:
    """Names of the shipped presets (presets/*.json)."""
    return sorted(p.name[:-5] for p in resources.files("clip_pacl.presets").iterdir() if p.name.endswith(".json"))
