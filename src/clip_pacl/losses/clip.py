"""CLIP's symmetric InfoNCE: softmax cross-entropy over image->text and text->image logits, hard targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled cosine similarities (Bi, Bt) of L2-normalised (Bi, D) and (Bt, D) features.

    `logit_scale` is the scale itself (the inverse temperature, e.g. 1 / 0.07), as `CLIP.forward` returns it: the
    exp of the model's log-space parameter, as open_clip's losses take it.
    """
    logits = logit_scale * image_features @ text_features.T  # (Bi, Bt)
    return logits if logit_bias is None else logits + logit_bias


def softmax_contrastive_loss(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, offset: int = 0,
    column_valid: torch.Tensor | None = None, row_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the two cross-entropies; row i's positive is column `offset + i`.

    Both are (b, G): b local rows against G candidates. `offset` is where this rank's rows sit
    in the gathered batch (0 on one process), so the same code serves local-loss mode. Under DDP the
    gathered batch holds padding: `column_valid` (G,) drops padded candidates, `row_valid` (b,) padded rows.
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + offset
    if column_valid is not None:
        logits_per_image = logits_per_image.masked_fill(~column_valid, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(~column_valid, float("-inf"))
    if row_valid is not None:
        labels = labels.masked_fill(~row_valid, -100)  # cross_entropy's ignore_index: the mean skips them
    return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's loss on one batch of B matching pairs: (B, D) image and text features, pair i is (i, i), and the
    scale (not its log): `clip_loss(*model(images, texts))`. Equals open_clip's `ClipLoss()` on the same inputs."""
    logits = clip_logits(image_features, text_features, logit_scale, logit_bias)
    return softmax_contrastive_loss(logits, logits.T)
