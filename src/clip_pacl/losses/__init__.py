"""Contrastive objectives as pure functions of features, and the registry `--objective` picks from.

One convention from the model to the losses, open_clip's: a model's `logit_scale` *parameter* is the log of the
scale (learned in log space, clamped at ln 100 after each step), its `forward` returns the scale itself,
`logit_scale.exp()`, and every loss here takes that scale (never its log) with `logit_bias` (None unless the
objective learns one), so `clip_loss(*model(images, texts))` is CLIP's loss. Adding an objective is one line in
OBJECTIVES.
"""

from __future__ import annotations

from clip_pacl.errors import ConfigError
from clip_pacl.losses.clip import clip_logits, clip_loss, softmax_contrastive_loss
from clip_pacl.losses.distributed import gather_with_grad
from clip_pacl.losses.objective import Objective
from clip_pacl.losses.pacl import pacl_logits
from clip_pacl.losses.siglip import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, siglip_loss, sigmoid_pair_loss

OBJECTIVES: dict[str, Objective] = {
    "clip": Objective("clip", clip_logits, kind="softmax"),
    "siglip": Objective("siglip", clip_logits, kind="sigmoid", init_logit_scale=INIT_LOGIT_SCALE,
                        init_logit_bias=INIT_LOGIT_BIAS),
    "pacl": Objective("pacl", pacl_logits, kind="softmax"),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}' (known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name]


__all__ = [
    "OBJECTIVES", "Objective", "clip_logits", "clip_loss", "gather_with_grad", "get_objective", "sigmoid_pair_loss",
    "siglip_loss", "softmax_contrastive_loss",
]
