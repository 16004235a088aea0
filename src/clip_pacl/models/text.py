"""Causal text transformer, pooled at the end-of-text token (the highest id in each sequence)."""

from __future__ import annotations

import torch
from torch import nn

from clip_pacl.config import TextConfig
from clip_pacl.models.layers import LayerNorm, Transformer


class TextTransformer(nn.Module):
    """Token + position embeddings, a causal transformer, ln_final and the projection.

    `forward` (B, L) token ids -> (B, output_dim) pools at each row's EOT token; `forward_tokens` keeps every position.
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

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> pooled embedding (B, output_dim): the output at each row's EOT token."""
        x = self.transformer(self.embed(text), causal=True)  # (B, L, width)
        eot = text.argmax(dim=-1)  # (B,) the EOT token has the highest id
        pooled = x.gather(1, eot[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]  # (B, width)
        return self.ln_final(pooled) @ self.text_projection

    def forward_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Every position in the joint space: (B, L) -> (B, L, output_dim)."""
        x = self.transformer(self.embed(text), causal=True)
        return self.ln_final(x) @ self.text_projection
