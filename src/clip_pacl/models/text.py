"""Causal text transformer, pooled at the end-of-text token (the highest id in each sequence)."""

from __future__ import annotations

import math

import torch
from torch import nn

from clip_pacl.config import TextConfig
from clip_pacl.models.layers import LayerNorm, Transformer

# What one extra call of the tower costs, in padded tokens. On CPU, compute dominates but every call adds thread
# synchronisation that a busy machine makes expensive: split only where it saves a few hundred tokens (a batch of
# COCO-length captions stays whole, a batch mixing short and long text does not). On GPUs a call is bound by kernel
# launches until it holds thousands of tokens.
GROUP_OVERHEAD_TOKENS = {"cpu": 256}


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim: int, act: type[nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_weights()

    @property
    def output_dim(self) -> int:
        return self.text_projection.shape[1]

    def _check(self, text: torch.Tensor) -> None:
        if text.shape[1] > self.cfg.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, the model's context is {self.cfg.context_length}")

    def _embed(self, text: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings up to the longest EOT position: (B, L', width).

        The mask is causal, so a token's output depends only on the tokens before it: stopping at the batch's
        longest EOT gives exactly the same pooled outputs, and most captions are far shorter than the context."""
        length = int(eot.max()) + 1 if eot.numel() else 1
        text = text[:, :length]
        return self.token_embedding(text) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)

    def _pooled(self, text: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        x = self.transformer.forward_rows(self._embed(text, eot), eot, causal=True)  # (B, width), at each EOT
        return self.ln_final(x) @ self.text_projection

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) int token ids -> pooled embedding (B, output_dim).

        Rows are independent, so captions of very different lengths are encoded in groups of similar length
        (see `length_groups`), each group only up to its own longest EOT; the result is put back in input order."""
        self._check(text)
        eot = text.argmax(dim=-1)  # (B,) the EOT token has the highest id
        groups = length_groups(eot + 1, GROUP_OVERHEAD_TOKENS.get(text.device.type, 2048))
        if len(groups) == 1:
            return self._pooled(text, eot)
        pooled = torch.cat([self._pooled(text[group], eot[group]) for group in groups])
        return pooled[torch.argsort(torch.cat(groups))]

    def forward_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Every position up to the batch's longest EOT, in the joint space: (B, L', output_dim)."""
        self._check(text)
        x = self.transformer(self._embed(text, text.argmax(dim=-1)), causal=True)
        return self.ln_final(x) @ self.text_projection


def length_groups(lengths: torch.Tensor, overhead_tokens: int = 256) -> list[torch.Tensor]:
    """Indices of the batch split into groups of similar sequence length.

    Minimises the padded token count, sum over groups of (rows x longest length), plus `overhead_tokens` per group
    (a group's fixed cost: more calls, smaller matrix products); an exact dynamic programme over the distinct
    lengths (at most the context length, 77). A batch of equal lengths stays one group."""
    values, counts = torch.unique(lengths, return_counts=True)  # sorted ascending
    if len(values) <= 1:
        return [torch.arange(len(lengths), device=lengths.device)]
    values, counts = values.tolist(), counts.tolist()
    rows_before = [0]
    for count in counts:
        rows_before.append(rows_before[-1] + count)
    best = [0.0] + [math.inf] * len(values)  # best[j]: cost of the j shortest distinct lengths
    start = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        for i in range(j):
            cost = best[i] + (rows_before[j] - rows_before[i]) * values[j - 1] + overhead_tokens
            if cost < best[j]:
                best[j], start[j] = cost, i
    bounds, j = [], len(values)
    while j > 0:
        bounds.append((values[start[j]], values[j - 1]))
        j = start[j]
    return [torch.nonzero((lengths >= low) & (lengths <= high)).flatten() for low, high in reversed(bounds)]
