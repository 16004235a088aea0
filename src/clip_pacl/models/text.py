"""Causal text transformer, pooled at the end-of-text token (the highest id in each sequence).

Its inference path (`forward(text, fast=True)`, see `models/layers.py`) adds two exact tricks to the blocks' own:

- EOT trimming: the mask is causal, so the output at a row's EOT does not depend on the padding after it; running
  only up to the batch's longest EOT is exact, and captions are far shorter than the 77-token context. (One host
  sync: the trimmed length.)
- Length grouping: `length_groups` splits a batch of very different lengths into groups that are each trimmed to
  their own longest EOT (an exact dynamic programme over padded tokens; one `.tolist()` sync).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clip_pacl.config import TextConfig
from clip_pacl.models.layers import LayerNorm, Transformer

# What one extra call of the text tower costs, in padded tokens (length grouping). On CPU, compute dominates but
# every call adds thread synchronisation that a busy machine makes expensive: split only where it saves a few
# hundred tokens (a batch of COCO-length captions stays whole, a batch mixing short and long text does not). On GPUs
# a call is bound by kernel launches until it holds thousands of tokens.
GROUP_OVERHEAD_TOKENS = {"cpu": 256}


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


class TextTransformer(nn.Module):
    """Token + position embeddings, a causal transformer, ln_final and the projection.

    `forward` (B, L) token ids -> (B, output_dim) pools at each row's EOT token; `forward_tokens` keeps every position.
    `forward(text, fast=True)` is the inference path: EOT trimming, length groups, the last block at EOT only.
    """

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
        """The joint embedding width D."""
        return self.text_projection.shape[1]

    def embed(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, L <= context_length -> (B, L, width) token + position embeddings."""
        if text.shape[1] > self.cfg.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, the model's context is {self.cfg.context_length}: "
                             "tokenize with the model's own tokenizer, clip_pacl.get_tokenizer(model)")
        pos = self.positional_embedding[: text.shape[1]].to(self.token_embedding.weight.dtype)
        return self.token_embedding(text) + pos

    @staticmethod
    def trim_padding(text: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """(B, L) token ids cut to (B, L') one past the batch's last EOT (rounded up to a multiple of `multiple`, at
        most L): what follows is padding that no output depends on (causal attention, pooled at EOT), so `forward`
        gives the same values and gradients. Meant for host tensors (a training batch before it goes to the device):
        on a GPU the cut length is a sync. A compiled model wants few distinct lengths: `multiple` 16."""
        if not text.numel():
            return text
        length = int(text.argmax(dim=-1).max()) + 1
        return text[:, : min(-(-length // multiple) * multiple, text.shape[1])]

    def forward(self, text: torch.Tensor, fast: bool = False, trim: bool = True) -> torch.Tensor:
        """(B, L) token ids -> pooled embedding (B, output_dim): the output at each row's EOT token.

        `fast`: the inference path (trimmed, grouped by length, the last block at EOT only, oneDNN linears); with
        `trim=False` it keeps the full context (one-row last block only), for a traced graph that must not depend on
        the example's length."""
        eot = text.argmax(dim=-1)  # (B,) the EOT token has the highest id
        if fast:
            return self._forward_fast(text, eot, trim)
        x = self.transformer(self.embed(text), causal=True)  # (B, L, width)
        pooled = x.gather(1, eot[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]  # (B, width)
        return self.ln_final(pooled) @ self.text_projection

    def _forward_fast(self, text: torch.Tensor, eot: torch.Tensor, trim: bool) -> torch.Tensor:
        if not trim:
            return self._pooled_fast(text, eot)
        groups = length_groups(eot + 1, GROUP_OVERHEAD_TOKENS.get(text.device.type, 2048))
        if len(groups) == 1:
            return self._pooled_fast(text[:, : int(eot.max()) + 1 if eot.numel() else 1], eot)
        pooled = torch.cat([self._pooled_fast(text[group, : int(eot[group].max()) + 1], eot[group])
                            for group in groups])
        return pooled[torch.argsort(torch.cat(groups))]

    def _pooled_fast(self, text: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """(B, L') token ids (maybe trimmed), their EOT positions (B,) -> (B, output_dim)."""
        x = self.transformer.forward_row(self.embed(text), eot, causal=True)  # (B, width), at each EOT
        return self.ln_final(x) @ self.text_projection

    def forward_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Every position in the joint space: (B, L) -> (B, L, output_dim)."""
        x = self.transformer(self.embed(text), causal=True)
        return self.ln_final(x) @ self.text_projection

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """The tower from input to output in groups (`lock_text_tower` unlocks the last N): [embeddings, block 0,
        ..., block n-2, block n-1 + head (ln_final, text_projection)]."""
        blocks = list(self.transformer.resblocks)
        embeddings = [self.token_embedding, self.positional_embedding]
        return [embeddings, *[[b] for b in blocks[:-1]], [blocks[-1], self.ln_final, self.text_projection]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only) to save memory."""
        self.transformer.set_grad_checkpointing(enable)
