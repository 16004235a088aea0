"""CLIP from pretrained third-party towers: a timm image model and a Hugging Face text model, with trainable
projection heads into a shared space and CLIP's learned temperature (the design of the project's seeds:
ResNet-50 + DistilBERT + projection heads).

A model spec names the towers (the `--model` argument of `clip-pacl train`):

```
backbone:IMAGE+TEXT[+key=value ...]

IMAGE  timm/NAME            timm registry model with its pretrained weights (timm downloads and caches them)
       timm/NAME=FILE       that architecture, weights from a local .safetensors / .pth / .bin file
       timm/NAME=random     that architecture, randomly initialised
       timm=DIR             a timm model folder (config.json with "architecture" + weights, as timm's save_for_hf
                            / push_to_hub write it)
TEXT   hf/REPO_ID           transformers AutoModel + AutoTokenizer from the Hugging Face Hub (or its cache)
       hf=DIR               a local save_pretrained() folder holding the model and its tokenizer
key=value                   embed_dim (256), head (linear | mlp), pool (cls | mean), context_length (77),
                            image_size (the timm model's default)
```

e.g. `backbone:timm/resnet50+hf/distilbert-base-uncased`,
`backbone:timm/resnet50=/weights/resnet50.safetensors+hf=/weights/distilbert+embed_dim=512+head=mlp`.

The model keeps the training contract (`loss_features`, `logit_scale`, `logit_bias`) and the zero-shot one
(`encode_image`, `encode_text`, `similarity`), and brings its own preprocessing: `tokenize(texts)` with the
text model's tokenizer (padded to `context_length`; the attention mask is recovered from the pad id) and
`image_transform(train)` with the image model's mean/std and size. Checkpoints (`checkpoint/backbone.py`) are
self-contained and load offline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.config import MAX_SIZE, config_float, config_int
from clip_pacl.errors import CheckpointError, ConfigError, MissingDependencyError
from clip_pacl.limits import check_model_size
from clip_pacl.models.clip import CLIPOutput

SPEC_PREFIX = "backbone:"
SPEC_SYNTAX = "backbone:timm/NAME[=FILE|=random]|timm=DIR + hf/REPO_ID|hf=DIR [+key=value ...]"
# The timm architecture settings a config.json's `model_args` may carry. Anything else is refused: timm's loader
# arguments (`checkpoint_path`, `pretrained_cfg_overlay`, ...) would make it read files nobody named.
TIMM_MODEL_ARGS = frozenset({
    "img_size", "in_chans", "patch_size", "embed_dim", "depth", "depths", "num_heads", "mlp_ratio", "qkv_bias",
    "global_pool", "class_token", "reg_tokens", "no_embed_class", "pre_norm", "fc_norm", "dynamic_img_size",
    "dynamic_img_pad", "init_values", "drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate",
    "output_stride", "layers", "channels", "dims", "stem_type", "stem_width", "act_layer", "norm_layer",
    "strict_img_size", "use_naflex", "num_classes",
})


def import_timm():
    """The timm module, or a MissingDependencyError naming the extra to install."""
    try:
        import timm
    except ImportError:
        raise MissingDependencyError("timm", "backbones", "backbone models") from None
    return timm


def import_transformers():
    """The transformers module, or a MissingDependencyError naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "backbones", "backbone models") from None
    return transformers


@dataclass(frozen=True)
class BackboneConfig:
    """The towers (a parsed `backbone:` spec) and the heads' options; saved in the checkpoint's config.json."""

    image: str  # the IMAGE part of the spec, e.g. "timm/resnet50"
    text: str  # the TEXT part, e.g. "hf/distilbert-base-uncased"
    embed_dim: int = 256
    head: str = "linear"  # linear (CLIP) | mlp (the seeds' residual projection head)
    pool: str = "cls"  # text pooling: first token (BERT's [CLS]) | mean over non-pad tokens
    context_length: int = 77
    image_size: int | None = None  # None: the image model's default input size
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self) -> None:
        if not all(isinstance(getattr(self, k), str) for k in ("image", "text", "head", "pool")):
            raise ConfigError("a backbone config's image, text, head and pool must be strings")
        for name in ("embed_dim", "context_length", "image_size"):
            if name != "image_size" or self.image_size is not None:
                config_int(getattr(self, name), name, 1, MAX_SIZE)
        config_float(self.init_logit_scale, "init_logit_scale")
        if not (self.image.startswith("timm/") or self.image.startswith("timm=")):
            raise ConfigError(f"image tower '{self.image}' must start with timm/ or timm= ({SPEC_SYNTAX})")
        if not (self.text.startswith("hf/") or self.text.startswith("hf=")):
            raise ConfigError(f"text tower '{self.text}' must start with hf/ or hf= ({SPEC_SYNTAX})")
        if self.head not in ("linear", "mlp"):
            raise ConfigError(f"head must be linear or mlp, not '{self.head}'")
        if self.pool not in ("cls", "mean"):
            raise ConfigError(f"pool must be cls or mean, not '{self.pool}'")
        if self.embed_dim < 1 or self.context_length < 2 or (self.image_size is not None and self.image_size < 8):
            raise ConfigError("embed_dim, context_length and image_size must be positive sizes")

    @classmethod
    def from_spec(cls, spec: str) -> BackboneConfig:
        """Parse `backbone:IMAGE+TEXT[+key=value ...]` (see the module docstring)."""
        body = spec.removeprefix(SPEC_PREFIX)
        parts = [p for p in body.split("+") if p]
        image = [p for p in parts if p.startswith(("timm/", "timm="))]
        text = [p for p in parts if p.startswith(("hf/", "hf="))]
        if len(image) != 1 or len(text) != 1:
            raise ConfigError(f"'{spec}' needs exactly one timm image tower and one hf text tower: {SPEC_SYNTAX}")
        options: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for part in parts:
            if part in (image[0], text[0]):
                continue
            key, sep, value = part.partition("=")
            if not sep or key not in ("embed_dim", "head", "pool", "context_length", "image_size"):
                raise ConfigError(f"unknown option '{part}' in '{spec}' (options: embed_dim, head, pool, "
                                  f"context_length, image_size)")
            try:
                options[key] = int(value) if "int" in str(types[key]) else value
            except ValueError:
                raise ConfigError(f"option {key} needs a whole number, not '{value}'") from None
        return cls(image=image[0], text=text[0], **options)

    def to_spec(self) -> str:
        """The `backbone:` spec string, with only the non-default options."""
        defaults = BackboneConfig(self.image, self.text)
        opts = [f"{k}={v}" for k, v in asdict(self).items()
                if k not in ("image", "text", "init_logit_scale") and v != getattr(defaults, k)]
        return SPEC_PREFIX + "+".join([self.image, self.text, *opts])

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        """Inverse of `to_dict` (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class ProjectionHead(nn.Module):
    """The seeds' head: linear projection, then GELU -> linear -> dropout as a residual, then LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        projected = self.projection(x)  # (B, D)
        return self.layer_norm(projected + self.dropout(self.fc(F.gelu(projected))))


def _head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=False) if kind == "linear" else ProjectionHead(in_dim, out_dim)


class HFTokenize:
    """A picklable tokenizer callable for loader workers: text(s) -> (B, context_length) ids, pad-filled."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Text(s) -> (B, context_length) token ids."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(batch, padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return out["input_ids"].long()  # (B, L)


def checked_model_args(args: Any, source: Path) -> dict[str, Any]:
    """`model_args` from a config.json, if every entry is an allowed architecture setting with a plain value
    (less `num_classes`, which `save_for_hf` records: our towers never have a classifier)."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{source}: model_args must be a JSON object")
    for key, value in args.items():
        plain = value is None or isinstance(value, (bool, int, float, str)) or (
            isinstance(value, list) and all(isinstance(v, (bool, int, float)) for v in value))
        if key not in TIMM_MODEL_ARGS or not plain:
            raise CheckpointError(f"{source} sets model_args '{key}', which clip-pacl does not pass to timm "
                                  f"(allowed, with plain values: {', '.join(sorted(TIMM_MODEL_ARGS))})")
    return {k: v for k, v in args.items() if k != "num_classes"}


def _load_image_tower(spec: str, pretrained: bool) -> tuple[nn.Module, dict[str, Any]]:
    """(timm model without classifier -> (B, F) pooled features, how to rebuild it without weights)."""
    timm = import_timm()
    if spec.startswith("timm="):
        folder = Path(spec.removeprefix("timm="))
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{folder} is not a timm model folder (no config.json)")
        cfg = json.loads(cfg_file.read_text())
        arch, model_args = cfg.get("architecture"), checked_model_args(cfg.get("model_args") or {}, cfg_file)
        if not arch:
            raise CheckpointError(f"{cfg_file} does not name an 'architecture'")
        name, kwargs = (f"local-dir:{folder}", {}) if pretrained else (arch, model_args)
    else:
        arch, _, weights = spec.removeprefix("timm/").partition("=")
        name, kwargs, model_args = arch, {}, {}
        if weights and weights != "random":
            if not Path(weights).is_file():
                raise CheckpointError(f"image weights {weights} do not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": weights}
        pretrained = pretrained and weights != "random"
    if not timm.is_model(arch):
        raise ConfigError(f"timm has no model '{arch}' (see timm.list_models())")
    with torch.device("meta"):  # the architecture's size, before anything is allocated
        check_model_size(timm.create_model(arch, pretrained=False, num_classes=0, **model_args), spec)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot load image tower '{spec}': {' '.join(str(e).split())[:300]}; for offline "
                              f"use, pass local weights (timm/{arch}=FILE or timm=DIR)") from None
    return model, {"arch": arch, "model_args": model_args}


def _load_text_tower(spec: str) -> tuple[nn.Module, Any]:
    transformers = import_transformers()
    source = spec.removeprefix("hf/") if spec.startswith("hf/") else spec.removeprefix("hf=")
    if spec.startswith("hf=") and not Path(source).is_dir():
        raise CheckpointError(f"text model folder {source} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        with torch.device("meta"):  # the architecture's size, before anything is allocated
            check_model_size(transformers.AutoModel.from_config(config), spec)
        model = transformers.AutoModel.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load text tower '{spec}': {' '.join(str(e).split())[:300]}; for offline "
                              f"use, pass a local save_pretrained() folder as hf=DIR") from None
    return model, tokenizer


class BackboneCLIP(nn.Module):
    """visual (timm) -> image_head, text (transformers) -> text_head, both into `embed_dim`; learned temperature."""

    model_type = "backbone"
    objectives = ("clip", "siglip")  # the objectives it trains under (`clip-pacl train --objective`), the first default

    def __init__(self, config: BackboneConfig, visual: nn.Module, text: nn.Module, tokenizer: Any,
                 image_info: dict[str, Any]):
        super().__init__()
        self.config = config
        self.visual = visual
        self.text = text
        self.tokenizer = tokenizer
        self.image_info = image_info
        self.image_head = _head(config.head, visual.num_features, config.embed_dim)
        self.text_head = _head(config.head, text.config.hidden_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = None
        data_config = import_timm().data.resolve_data_config({}, model=visual)
        if config.image_size is not None:
            data_config["input_size"] = (3, config.image_size, config.image_size)
        self.data_config = data_config
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad_id is None else int(pad_id)

    @classmethod
    def from_spec(cls, spec: str | BackboneConfig) -> BackboneCLIP:
        """Build with the towers' pretrained weights and freshly initialised heads."""
        config = spec if isinstance(spec, BackboneConfig) else BackboneConfig.from_spec(spec)
        visual, image_info = _load_image_tower(config.image, pretrained=True)
        text, tokenizer = _load_text_tower(config.text)
        return cls(config, visual, text, tokenizer, image_info)

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        """Side of the square input images (the timm model's default unless configured)."""
        return int(self.data_config["input_size"][-1])

    @property
    def context_length(self) -> int:
        """Token ids per text."""
        return self.config.context_length

    @property
    def embed_dim(self) -> int:
        """Width D of the joint space."""
        return self.config.embed_dim

    # ------------------------------------------------------------------ preprocessing
    def get_tokenizer(self) -> HFTokenize:
        """The text model's tokenizer as a picklable callable: texts -> (B, context_length) ids."""
        return HFTokenize(self.tokenizer, self.context_length)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """Text(s) -> (B, context_length) token ids of the text model, padded with its pad id."""
        return self.get_tokenizer()(texts)

    def image_transform(self, train: bool = False, image_size: int | None = None) -> Callable:
        """PIL image -> (3, S, S) tensor with the image model's normalisation, S = `image_size` or the model's.

        Training uses CLIP's augmentation (a mild random resized crop) rather than ImageNet's: flips and
        colour jitter would contradict captions that say "left of" or "red".
        """
        from torchvision import transforms as T

        size = image_size or self.image_size
        mean, std = self.data_config["mean"], self.data_config["std"]
        interpolation = T.InterpolationMode.BICUBIC if self.data_config.get("interpolation") == "bicubic" \
            else T.InterpolationMode.BILINEAR
        if train:
            steps = [T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=interpolation)]
        else:
            crop_pct = float(self.data_config.get("crop_pct") or 1.0)
            steps = [T.Resize(int(math.floor(size / crop_pct)), interpolation=interpolation), T.CenterCrop(size)]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D)."""
        dtype = next(self.visual.parameters()).dtype  # float32, or bfloat16 after `set_tower_dtype`
        x = self.image_head(self.visual(images.to(dtype)).float())  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids from `tokenize` -> (B, D)."""
        mask = tokens.ne(self.pad_id).long()  # (B, L)
        mask[:, 0] = 1  # a pad id that is also the first token (no special tokens) must not empty the row
        hidden = self.text(input_ids=tokens, attention_mask=mask).last_hidden_state.float()  # (B, L, H)
        if self.config.pool == "cls":
            pooled = hidden[:, 0]  # (B, H)
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, H)
        x = self.text_head(pooled)  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> CLIPOutput:
        """Normalised image (B, D) and text (B, D) features with the scale exp(logit_scale): the losses' inputs, as
        CLIP.forward."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return CLIPOutput(image_features, text_features, self.logit_scale.exp(), self.logit_bias)

    def similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, C) of images to normalised text features (C, D)."""
        return self.encode_image(images, normalize=True) @ text_features.T

    def set_tower_dtype(self, dtype: torch.dtype) -> BackboneCLIP:
        """Cast the timm and transformers towers to `dtype` for inference; the heads and the features they return
        stay float32 (as `CLIP.set_tower_dtype`)."""
        self.visual.to(dtype)
        self.text.to(dtype)
        return self

    def trim_text_padding(self, tokens: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """The token ids unchanged: the text model's padding is masked, not cut."""
        return tokens

    def loss_features(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, D) image and text features: what the contrastive losses consume."""
        return self.encode_image(images, normalize=True), self.encode_text(texts, normalize=True)

    def image_layer_groups(self) -> list[list[nn.Module]]:
        """The timm image tower's top-level child modules that hold parameters, input to output, one group each
        (LiT locking unlocks the last N)."""
        return [[child] for child in self.visual.children() if any(True for _ in child.parameters())]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in both towers (where the text model supports it)."""
        self.visual.set_grad_checkpointing(enable)
        if enable and getattr(self.text, "supports_gradient_checkpointing", False):
            self.text.gradient_checkpointing_enable()
        elif not enable and getattr(self.text, "is_gradient_checkpointing", False):
            self.text.gradient_checkpointing_disable()


def build_backbone(spec: str) -> BackboneCLIP:
    """`backbone:IMAGE+TEXT[+key=value ...]` -> a model with pretrained towers and new heads."""
    return BackboneCLIP.from_spec(spec)
