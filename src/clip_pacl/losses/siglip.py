"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every image-text pair is its own binary problem.

It needs a learned bias besides the temperature (init log-scale ln 10, bias -10, as in the paper),
so the model gets `logit_bias` through `CLIPConfig.init_logit_bias`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clip_pacl.losses.clip import clip_logits

INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -10.0


def sigmoid_pair_loss(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """-sum log sigmoid(z_ij * logit_ij) / b for (b, G) logits; z = +1 on (i, offset + i), -1 elsewhere.

    Normalised by the number of rows (images), as in the paper, so per-rank losses average to the
    global one when each rank holds b of the B rows.
    """
    b, g = logits.shape
    signs = -torch.ones(b, g, device=logits.device, dtype=torch.float32)
    signs[torch.arange(b, device=logits.device), torch.arange(b, device=logits.device) + offset] = 1.0
    return -F.logsigmoid(signs * logits.float()).sum() / b


def siglip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's loss on one batch of B matching pairs ((B, D) normalised features)."""
    return sigmoid_pair_loss(clip_logits(image_features, text_features, logit_scale, logit_bias))
