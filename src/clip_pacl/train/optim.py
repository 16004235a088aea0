"""AdamW with CLIP's parameter groups, and LiT-style tower locking."""

from __future__ import annotations

import math

import torch
from torch import nn

from clip_pacl.errors import ConfigError

MAX_LOGIT_SCALE = math.log(100.0)


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms' gains (every 1-D tensor), embeddings and the temperature are not decayed (as open_clip)."""
    return param.ndim < 2 or "embedding" in name or "logit_scale" in name or "logit_bias" in name


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: decayed weights in one group, the rest in another.

    Build it after moving the model to its device (the fused kernel is chosen for the parameters' device).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("nothing to train: every parameter is frozen (check --lock-image / --lock-text)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel updates every tensor of a group in one pass (tiny models spend much of a step here)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learned temperature's scale in [1, 100] (CLIP clips it at 100 to keep training stable)."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.clamp_(0, MAX_LOGIT_SCALE)


def _group_parameters(group: list[nn.Module | nn.Parameter]) -> list[nn.Parameter]:
    return [p for item in group for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())]


def freeze(module: nn.Module) -> None:
    """No gradients; `set_train_mode` then keeps its BatchNorms in eval mode (frozen statistics)."""
    for p in module.parameters():
        p.requires_grad_(False)


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0) -> None:
    """LiT: freeze the image tower except its last `unlocked_groups` layer groups, as the model's
    `image_layer_groups()` gives them (ViT: stem, blocks, the last with the head; ResNet: stem, stages, the last
    with the attention pool; a timm backbone: its top-level children)."""
    groups = model.image_layer_groups()
    if not 0 <= unlocked_groups <= len(groups):
        raise ConfigError(f"--lock-image-unlocked-groups must be between 0 and {len(groups)}, not {unlocked_groups}")
    freeze(model.visual)
    for group in groups[len(groups) - unlocked_groups:]:
        for p in _group_parameters(group):
            p.requires_grad_(True)


def lock_text_tower(model: nn.Module) -> None:
    freeze(model.text)


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorms whose parameters are all frozen stay in eval mode (frozen statistics)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
