"""PACL's symmetric InfoNCE loss over the patch-aligned compatibility phi of every image-text pair of a batch.

phi itself (`clip_pacl.models.pacl.compatibility`, exact for all B x B pairs without a (B, B, D) tensor) lives
with the model, which scores images with it too; the loss is a pure function of the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clip_pacl.models.pacl import compatibility


def pacl_logits(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Logits per image (B_img, B_txt): logit_scale * phi (+ bias), `logit_scale` the scale itself (not its log)."""
    logits = logit_scale * compatibility(patch_emb, text_emb, chunk_size)
    return logits + logit_bias if logit_bias is not None else logits


def pacl_loss(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over phi: patch_emb (B, N, D), text_emb (B, D), pair b matches b."""
    logits = pacl_logits(patch_emb, text_emb, logit_scale, logit_bias, chunk_size)  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
