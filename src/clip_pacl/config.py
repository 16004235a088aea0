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

# Sanity bounds on single config values (the model's total size is bounded by limits.py): no CLIP comes
# near them, and they keep a hostile config's numbers from overflowing before that check.
MAX_SIZE = 1 << 20  # widths, image and patch sizes, vocabulary, context length
MAX_LAYERS = 1024
MAX_RATIO = 64.0  # mlp_ratio


def config_int(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as a whole number (a JSON int, or a float with no fraction), within [low, high] when given;
    else a one-line ConfigError naming `what`."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    bounds = f" from {low} to {high}" if low is not None and high is not None else ""
    raise ConfigError(f"{what} must be a whole number{bounds}, not {value!r}")


def config_float(value: Any, what: str, positive: bool = False, high: float | None = None) -> float:
    """`value` as a finite number (positive, at most `high`, when asked); else a one-line ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (not positive or value > 0) and (high is None or value <= high):
        return float(value)
    bound = f"{'positive ' if positive else ''}finite number{f' up to {high}' if high is not None else ''}"
    raise ConfigError(f"{what} must be a {bound}, not {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. `layers` as an int means a ViT; a 4-tuple means OpenAI's ModifiedResNet."""

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            if len(self.layers) != 4:
                raise ConfigError(f"vision.layers of a ResNet must list 4 stages, not {list(self.layers)}")
            for n in self.layers:
                config_int(n, "vision.layers (each ResNet stage)", 1, MAX_LAYERS)
        else:
            config_int(self.layers, "vision.layers", 1, MAX_LAYERS)
        for name in ("image_size", "width", "head_width", "patch_size"):
            config_int(getattr(self, name), f"vision.{name}", 1, MAX_SIZE)
        config_float(self.mlp_ratio, "vision.mlp_ratio", positive=True, high=MAX_RATIO)
        channels = self.width * 32 if self.is_resnet else self.width
        if channels % self.head_width:
            raise ConfigError(f"vision width {channels} is not divisible by head_width {self.head_width}")
        if self.image_size < self.stride:
            raise ConfigError(f"vision.image_size {self.image_size} is smaller than one patch ({self.stride})")

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

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "width", "heads"):
            config_int(getattr(self, name), f"text.{name}", 1, MAX_SIZE)
        config_int(self.layers, "text.layers", 1, MAX_LAYERS)
        config_float(self.mlp_ratio, "text.mlp_ratio", positive=True, high=MAX_RATIO)
        if self.width % self.heads:
            raise ConfigError(f"text.width {self.width} is not divisible by text.heads {self.heads}")


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

    def __post_init__(self) -> None:
        config_int(self.embed_dim, "embed_dim", 1, MAX_SIZE)
        config_float(self.init_logit_scale, "init_logit_scale")
        if self.init_logit_bias is not None:
            config_float(self.init_logit_bias, "init_logit_bias")
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.text, TextConfig):
            raise ConfigError("a CLIP config needs a vision and a text tower config")
        if not isinstance(self.quick_gelu, bool) or not (self.name is None or isinstance(self.name, str)):
            raise ConfigError(f"quick_gelu must be true or false and name a string, not {self.quick_gelu!r} and "
                              f"{self.name!r}")

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
        if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("vision_cfg", "text_cfg")) \
                or "embed_dim" not in data:
            raise ConfigError("not an open_clip model config: it needs embed_dim and the objects vision_cfg, text_cfg")
        vcfg, tcfg = data["vision_cfg"], data["text_cfg"]
        unsupported = [k for k in ("timm_model_name", "hf_model_name") if vcfg.get(k) or tcfg.get(k)]
        if unsupported:
            raise ConfigError(
                f"config uses third-party towers ({', '.join(unsupported)}); use a backbone: model instead"
            )
        layers = vcfg.get("layers", 12)
        if isinstance(layers, (list, tuple)):
            layers = tuple(config_int(x, "vision_cfg.layers") for x in layers)
        vision = VisionConfig(
            image_size=_as_int(vcfg.get("image_size", 224), "vision_cfg.image_size"),
            layers=layers,
            width=config_int(vcfg.get("width", 768), "vision_cfg.width"),
            head_width=config_int(vcfg.get("head_width", 64), "vision_cfg.head_width"),
            mlp_ratio=config_float(vcfg.get("mlp_ratio", 4.0), "vision_cfg.mlp_ratio"),
            patch_size=_as_int(vcfg.get("patch_size", 16), "vision_cfg.patch_size"),
        )
        text = TextConfig(**{key: config_int(tcfg.get(key, default), f"text_cfg.{key}") for key, default in
                             (("context_length", 77), ("vocab_size", 49408), ("width", 512), ("heads", 8),
                              ("layers", 12))},
                          mlp_ratio=config_float(tcfg.get("mlp_ratio", 4.0), "text_cfg.mlp_ratio"))
        kwargs: dict[str, Any] = {"embed_dim": config_int(data["embed_dim"], "embed_dim"), "vision": vision,
                                  "text": text, "name": name, "quick_gelu": data.get("quick_gelu", False)}
        for key in ("init_logit_scale", "init_logit_bias"):
            if data.get(key) is not None:
                kwargs[key] = config_float(data[key], key)
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
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> CLIPConfig:
        """Inverse of `to_dict`. Unknown top-level keys (`model_type`, a run's extra fields) are ignored; the
        towers' keys must be known and every value of the right type and range (one ConfigError line)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} does not hold a CLIP config (not a JSON object)")
        d = dict(d)
        towers = {}
        for key, tower in (("vision", VisionConfig), ("text", TextConfig)):
            given = d.pop(key, None)
            if not isinstance(given, dict):
                raise ConfigError(f"{source}: {key} must be an object of the {key} tower's settings, not "
                                  f"{type(given).__name__}")
            known = {f.name for f in fields(tower)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ConfigError(f"{source}: unknown {key} setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
            towers[key] = given
        if isinstance(towers["vision"].get("layers"), list):
            towers["vision"]["layers"] = tuple(towers["vision"]["layers"])
        known = {f.name for f in fields(cls)}
        try:
            return cls(vision=VisionConfig(**towers["vision"]), text=TextConfig(**towers["text"]),
                       **{k: v for k, v in d.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _as_int(x: Any, what: str) -> int:
    # open_clip allows (h, w) tuples for image_size / patch_size; we support square only.
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ConfigError(f"non-square sizes are not supported: {x}")
        x = x[0]
    return config_int(x, what)


def available_presets() -> list[str]:
    """Names of the shipped presets (presets/*.json)."""
    return sorted(p.name[:-5] for p in resources.files("clip_pacl.presets").iterdir() if p.name.endswith(".json"))


@dataclass(frozen=True)
class PACLConfig:
    """The trainable part of PACL. `None` dims follow the CLIP embed dim (hidden: 4x it).

    The defaults are what segments best on the evidence (README "Measured results": MaskCLIP tokens with a low pool
    temperature segment markedly better than the paper's settings on a small CLIP trained from scratch). The
    paper's settings are `PACLConfig.paper()`. Configs saved before a field existed are read with the value
    they were trained with (`LEGACY_DEFAULTS`), not today's default.
    """

    hidden_dim: int | None = None
    out_dim: int | None = None
    unfreeze_last_n_blocks: int = 0
    init_logit_scale: float = 2.6592600369644043  # ln(1 / 0.07)
    # Temperature of the softmax that pools patches, a = softmax(s / pool_temperature). The paper uses
    # softmax(s) (1.0); cosines lie in [-1, 1], so then the weights differ by at most e^2 and the pooled
    # embedding stays close to the plain mean of the patches. A lower value makes the pooling select patches.
    pool_temperature: float = 0.05
    # Which CLIP patch tokens feed the vision embedder: "tokens" (the last block's output, as in the paper)
    # or "maskclip" (the last block's value path, which keeps each token local; see encode_image_tokens).
    patch_tokens: str = "maskclip"
    # The cosine under which a patch is background, calibrated on the training captions without masks
    # (clip_pacl.segmentation.calibrate); None until calibrated.
    background_threshold: float | None = None

    # What a saved config that lacks a field was trained with: the paper's settings were the defaults then.
    LEGACY_DEFAULTS = {"pool_temperature": 1.0, "patch_tokens": "tokens"}

    @classmethod
    def paper(cls, **overrides) -> PACLConfig:
        """The paper's settings: last-block tokens, pooling softmax(s)."""
        return cls(**{**cls.LEGACY_DEFAULTS, **overrides})

    def to_dict(self) -> dict:
        """JSON-ready fields (the `pacl` entry of a PACL checkpoint's config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PACLConfig:
        """Inverse of `to_dict`; unknown keys are a ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown PACL config keys: {', '.join(sorted(unknown))}")
        return cls(**{**cls.LEGACY_DEFAULTS, **d})

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "out_dim"):
            if getattr(self, name) is not None:
                config_int(getattr(self, name), name, 1, MAX_SIZE)
        config_int(self.unfreeze_last_n_blocks, "unfreeze_last_n_blocks", 0, MAX_LAYERS)
        config_float(self.init_logit_scale, "init_logit_scale")
        config_float(self.pool_temperature, "pool_temperature", positive=True)
        if self.background_threshold is not None:
            config_float(self.background_threshold, "background_threshold")
        if self.patch_tokens not in ("tokens", "maskclip"):
            raise ConfigError(f"patch_tokens must be 'tokens' or 'maskclip', not '{self.patch_tokens}'")
