"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every image-text pair is its own binary problem.

It needs a learned bias besides the temperature (scale 10, i.e. the log-space parameter starts at ln 10, and bias
-10, as in the paper), so the model gets `logit_bias` through `CLIPConfig.init_logit_bias`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clip_pacl.losses.clip import clip_logits

INIT_LOGIT_SCALE = math.log(10.0)  # the model's log-space parameter: a scale of 10
INIT_LOGIT_BIAS = -10.0


def sigmoid_pair_loss(
    logits: torch.Tensor, offset: int = 0, column_valid: torch.Tensor | None = None,
    row_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """-sum log sigmoid(z_ij * logit_ij) / b for (b, G) logits; z = +1 on (i, offset + i), -1 elsewhere.

    Normalised by the number of rows (images), as in the paper, so per-rank losses average to the
    global one when each rank holds b of the B rows. Padded columns (`column_valid`) and rows (`row_valid`)
    of a gathered batch add nothing, and b counts the real rows.
    """
    b, g = logits.shape
    signs = -torch.ones(b, g, device=logits.device, dtype=torch.float32)
    signs[torch.arange(b, device=logits.device), torch.arange(b, device=logits.device) + offset] = 1.0
    terms = -F.logsigmoid(signs * logits.float())  # (b, G)
    if column_valid is not None:
        terms = terms * column_valid[None, :]
    if row_valid is None:
        return terms.sum() / b
    return (terms * row_valid[:, None]).sum() / row_valid.sum().clamp(min=1)


def siglip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's loss on one batch of B matching pairs ((B, D) normalised features), the scale (not its log) and the
    bias: `siglip_loss(*model(images, texts))`. Equals open_clip's `SigLipLoss()` on the same inputs."""
    return sigmoid_pair_loss(clip_logits(image_features, text_features, logit_scale, logit_bias))
