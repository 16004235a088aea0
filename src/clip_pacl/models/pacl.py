"""PACL: a frozen CLIP plus small vision/text embedders trained so that patches align with text.

Mukhoti et al., "Open Vocabulary Semantic Segmentation with Patch Aligned Contrastive Learning" (CVPR 2023).
Every patch token of the frozen image tower goes through a vision embedder e_v and the pooled text
embedding through a text embedder e_t; the image-text compatibility pools the patches with weights
softmax_i <e_v(v_i), e_t(t)> (see `clip_pacl.losses.pacl`). Because training only sees captions, the
patch-level similarity that results is what segments images.

Checkpoint layout (`save_checkpoint`): `config.json` (`"model_type": "pacl"`, the CLIP config under `clip`,
the PACL config under `pacl`), `model.safetensors` (the base CLIP's weights, copied in so the directory is
self-contained and stays right when the last blocks were fine-tuned) and `pacl.safetensors` (embedders,
logit scale).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clip_pacl.config import CLIPConfig
from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.losses.pacl import compatibility
from clip_pacl.models.clip import CLIP

PACL_WEIGHTS_NAME = "pacl.safetensors"


@dataclass(frozen=True)
class PACLConfig:
    """The trainable part of PACL. `None` dims follow the CLIP embed dim (hidden: 4x it).

    The defaults are what segments best on the evidence (README "Measured results": MaskCLIP tokens with pool
    temperature 0.05 score 0.579 mIoU against the paper's 0.348 on a small CLIP trained from scratch). The
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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PACLConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown PACL config keys: {', '.join(sorted(unknown))}")
        return cls(**{**cls.LEGACY_DEFAULTS, **d})

    def __post_init__(self) -> None:
        if self.pool_temperature <= 0:
            raise ConfigError(f"pool_temperature must be > 0, not {self.pool_temperature}")
        if self.patch_tokens not in ("tokens", "maskclip"):
            raise ConfigError(f"patch_tokens must be 'tokens' or 'maskclip', not '{self.patch_tokens}'")


class ResidualEmbedder(nn.Module):
    """A linear branch plus a two-layer MLP branch, summed (the paper's embedder).

    The linear branch starts as the identity when the dims match, so an untrained PACL scores patches
    like the raw CLIP patch tokens do and training refines that instead of starting from noise.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        if in_dim == out_dim:
            nn.init.eye_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.mlp[2].weight, std=0.02 * hidden_dim**-0.5)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class PACL(nn.Module):
    def __init__(self, clip: CLIP, config: PACLConfig | None = None):
        super().__init__()
        self.config = config or PACLConfig()
        self.clip = clip
        d = clip.embed_dim
        hidden = self.config.hidden_dim or 4 * d
        out = self.config.out_dim or d
        self.vision_embedder = ResidualEmbedder(d, hidden, out)
        self.text_embedder = ResidualEmbedder(d, hidden, out)
        self.logit_scale = nn.Parameter(torch.tensor(float(self.config.init_logit_scale)))
        self.logit_bias = None
        self._unfrozen = tuple(self._unfreeze(self.config.unfreeze_last_n_blocks))  # a tuple: not re-registered
        self.train(self.training)

    @classmethod
    def from_clip(cls, clip: CLIP, config: PACLConfig | None = None) -> PACL:
        return cls(clip, config)

    # ------------------------------------------------------------------ freezing
    def _unfreeze(self, n: int) -> list[nn.Module]:
        """Freeze the CLIP, then unfreeze the last `n` image-tower blocks and what maps them to patch tokens."""
        self.clip.requires_grad_(False)
        if n <= 0:
            return []
        visual = self.clip.visual
        if hasattr(visual, "transformer"):  # ViT: resblocks, then ln_post and proj (a bare Parameter)
            blocks = list(visual.transformer.resblocks)
            if n > len(blocks):
                raise ConfigError(f"unfreeze_last_n_blocks={n} but the image tower has {len(blocks)} blocks")
            modules = [*blocks[-n:], visual.ln_post]
            visual.proj.requires_grad_(True)
        else:  # ResNet: layer1..layer4, then the attention pool whose value path gives the patch tokens
            layers = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
            if n > len(layers):
                raise ConfigError(f"unfreeze_last_n_blocks={n} but the ResNet has {len(layers)} stages")
            modules = [*layers[-n:], visual.attnpool]
        for m in modules:
            m.requires_grad_(True)
        return modules

    def train(self, mode: bool = True) -> PACL:
        """Frozen CLIP parts stay in eval mode (no dropout, frozen BatchNorm statistics)."""
        super().train(mode)
        self.clip.eval()
        for m in self._unfrozen:
            m.train(mode)
        return self

    @property
    def vision_frozen(self) -> bool:
        """True when no image-tower weight trains, so patch tokens can be precomputed (--cache-features)."""
        return self.config.unfreeze_last_n_blocks == 0

    # ------------------------------------------------------------------ properties shared with CLIP
    @property
    def image_size(self) -> int:
        return self.clip.image_size

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def embed_dim(self) -> int:
        return self.vision_embedder.linear.out_features

    @property
    def grid_size(self) -> int:
        return self.clip.config.vision.grid_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ encoders
    def clip_patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's patch tokens (B, N, D_clip), without the pooled token; no graph when frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            return self.clip.encode_image_tokens(images, dense=self.config.patch_tokens)[:, 1:]

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised e_v per patch (B, N, D); `images` are pixels (B, 3, H, W) or CLIP patch tokens (B, N, D_clip)."""
        tokens = images if images.dim() == 3 else self.clip_patch_tokens(images)
        return F.normalize(self.vision_embedder(tokens), dim=-1)  # (B, N, D)

    def clip_text_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's pooled text embedding (B, D_clip)."""
        with torch.no_grad():
            return self.clip.encode_text(tokens)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """e_t (B, D). `tokens` may be token ids (B, L) or precomputed CLIP text embeddings (B, D_clip) float."""
        x = tokens if tokens.is_floating_point() else self.clip_text_embeddings(tokens)
        x = self.text_embedder(x)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """A text-independent image embedding (B, D): the mean of the normalised patch embeddings.

        PACL's own pooling depends on the text (`similarity`); this is for places that need one vector
        per image, such as a retrieval index. For scoring against texts prefer `similarity`.
        """
        x = self.patch_embeddings(images).mean(dim=1)
        return F.normalize(x, dim=-1) if normalize else x

    def pooling_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings scaled by 1 / pool_temperature (B, N, D): what the compatibility consumes.

        phi is a cosine, so scaling every patch leaves it unchanged except through the pooling softmax,
        where s_i becomes s_i / pool_temperature: the temperature rides on the features and the loss
        stays a pure function of them.
        """
        return self.patch_embeddings(images) / self.config.pool_temperature

    def similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """phi for every (image, class) pair (B, C); text_features (C, D) from `encode_text(..., normalize=True)`."""
        return compatibility(self.pooling_patches(images), F.normalize(text_features, dim=-1))

    def patch_similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Per-patch similarity s_i to each class (B, C, gh, gw): what segmentation upsamples."""
        patches = self.patch_embeddings(images)  # (B, N, D)
        gh, gw = _grid(self.clip, images, patches.shape[1])
        scores = torch.einsum("bnd,cd->bcn", patches, F.normalize(text_features, dim=-1).to(patches.dtype))
        return scores.reshape(scores.shape[0], scores.shape[1], gh, gw)

    def loss_features(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch embeddings (B, N, D) of norm 1 / pool_temperature, normalised text embeddings (B, D)) for the loss.

        Inputs may be precomputed CLIP features (see `clip_pacl.train.feature_cache`): float (B, N, D_clip)
        patch tokens instead of images, float (B, D_clip) text embeddings instead of token ids.
        """
        return self.pooling_patches(images), self.encode_text(texts, normalize=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, out_dir: str | Path) -> Path:
        from clip_pacl.checkpoint.io import CONFIG_NAME, WEIGHTS_NAME, _atomic_write

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        clip_state = {k: v.detach().contiguous().cpu() for k, v in self.clip.state_dict().items()}
        head_state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                      if not k.startswith("clip.")}
        _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(clip_state, str(p), metadata={"format": "pt"}))
        _atomic_write(out / PACL_WEIGHTS_NAME, lambda p: save_file(head_state, str(p), metadata={"format": "pt"}))
        cfg = {"model_type": "pacl", "clip": self.clip.config.to_dict(), "pacl": self.config.to_dict()}
        _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
        return out


def _grid(clip: CLIP, images: torch.Tensor, n: int) -> tuple[int, int]:
    """The (gh, gw) patch grid an image of this size produces (N = gh * gw)."""
    if images.dim() == 4:
        stride = 32 if clip.config.vision.is_resnet else clip.config.vision.patch_size
        gh, gw = images.shape[-2] // stride, images.shape[-1] // stride
        if gh * gw == n:
            return gh, gw
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot infer a patch grid for {n} patches")
    return side, side


def load_checkpoint(path: str | Path, device: str | torch.device | None = None) -> PACL:
    """Read a directory written by `PACL.save_checkpoint` (what `clip_pacl.load` calls for model_type "pacl")."""
    from clip_pacl.checkpoint.io import CONFIG_NAME, WEIGHTS_NAME, _load_state

    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME, PACL_WEIGHTS_NAME):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a PACL checkpoint (no {name})")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    if cfg.get("model_type") != "pacl" or "clip" not in cfg:
        raise CheckpointError(f"{path}/{CONFIG_NAME} does not describe a PACL model")
    clip = CLIP(CLIPConfig.from_dict(cfg["clip"]))
    map_location = str(device or "cpu")
    _load_state(clip, load_file(str(path / WEIGHTS_NAME), device=map_location), str(path / WEIGHTS_NAME))
    model = PACL(clip, PACLConfig.from_dict(cfg.get("pacl", {})))
    heads = load_file(str(path / PACL_WEIGHTS_NAME), device=map_location)
    result = model.load_state_dict(heads, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("clip.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path / PACL_WEIGHTS_NAME} does not match the PACL model "
                              f"(missing: {missing[:3]}, unexpected: {result.unexpected_keys[:3]})")
    return model.to(device) if device is not None else model
