"""PACL's patch-aligned compatibility and its symmetric InfoNCE loss, exact for every image-text pair.

For an image with normalised patch embeddings V (N, D) and a normalised text embedding t (D,):
    s = V t                  patch-text similarities (N,)
    a = softmax(s)           patch weights
    p = a^T V                text-conditioned pooled image embedding
    phi = <p, t> / |p|       the compatibility (cosine, since |t| = 1)
The loss needs phi for all B x B pairs. Forming p for every pair would be a (B, B, D) tensor
(or (B, B, N, D) before the sum); instead
    <p, t> = sum_i a_i s_i   and   |p|^2 = a^T G a  with  G = V V^T  (B, N, N), shared by every text,
so the largest tensor is (B, B_chunk, N). Chunks over texts are recomputed in the backward pass
(activation checkpointing) when gradients are needed, so peak memory stays O(B * chunk * N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _compatibility_block(patch_emb: torch.Tensor, gram: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """phi for every (image, text) pair of one text chunk: (B_img, N, D), (B_img, N, N), (C, D) -> (B_img, C)."""
    s = torch.einsum("bnd,cd->bcn", patch_emb, text_emb)  # (B_img, C, N)
    a = s.softmax(dim=-1)  # (B_img, C, N)
    dot = (a * s).sum(dim=-1)  # <p, t>: (B_img, C)
    sq_norm = (a * torch.einsum("bnm,bcm->bcn", gram, a)).sum(dim=-1)  # |p|^2 = a^T G a: (B_img, C)
    return dot / sq_norm.clamp_min(1e-12).sqrt()


def compatibility(patch_emb: torch.Tensor, text_emb: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """phi(x_b, y_c) for all pairs: patch_emb (B, N, D) and text_emb (C, D), both L2-normalised -> (B, C).

    Computed in float32 whatever the input dtype: the softmax-weighted norms lose too much in half precision.
    """
    patch_emb = patch_emb.float()
    text_emb = text_emb.float()
    gram = patch_emb @ patch_emb.transpose(1, 2)  # (B, N, N)
    needs_grad = torch.is_grad_enabled() and (patch_emb.requires_grad or text_emb.requires_grad)
    blocks = []
    for start in range(0, text_emb.shape[0], chunk_size):
        chunk = text_emb[start : start + chunk_size]
        if needs_grad and text_emb.shape[0] > chunk_size:
            blocks.append(checkpoint(_compatibility_block, patch_emb, gram, chunk, use_reentrant=False))
        else:
            blocks.append(_compatibility_block(patch_emb, gram, chunk))
    return torch.cat(blocks, dim=1)


def pacl_logits(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Logits per image (B_img, B_txt): exp(logit_scale) * phi (+ bias). `logit_scale` is in log space."""
    logits = logit_scale.exp() * compatibility(patch_emb, text_emb, chunk_size)
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
