"""Causal text transformer, pooled at the end-of-text token (the highest id in each sequence)."""

from __future__ import annotations

import torch
from torch import nn

from clip_pacl.config import TextConfig
from clip_pacl.models.layers import LayerNorm, Transformer


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

    def _run(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L, width) and EOT positions (B,).

        The mask is causal, so a token's output depends only on the tokens before it: running the
        batch only up to its longest EOT position gives exactly the same pooled outputs, and most
        captions are far shorter than the context.
        """
        if text.shape[1] > self.cfg.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, the model's context is {self.cfg.context_length}")
        eot = text.argmax(dim=-1)
        length = int(eot.max()) + 1 if text.numel() else 1
        text = text[:, :length]
        x = self.token_embedding(text) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)
        return self.transformer(x, causal=True), eot

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) int token ids -> pooled embedding (B, output_dim)."""
        x, eot = self._run(text)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return self.ln_final(x) @ self.text_projection

    def forward_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Every position up to the batch's longest EOT, in the joint space: (B, L', output_dim)."""
        x, _ = self._run(text)
        return self.ln_final(x) @ self.text_projection
