"""Transformer building blocks whose parameter names match OpenAI's and open_clip's weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 weights stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D), in x's dtype."""
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's sigmoid approximation of GELU; the original CLIP weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise, any shape."""
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (keys: in_proj_weight, out_proj.*)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values side by side: (..., D) -> (..., 3D)."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> three (B, H, N, D/H) tensors."""
        b, n, d = x.shape
        qkv = self.in_projection(x).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over every position: (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """Output when every token attends only to itself (MaskCLIP): out_proj(v_proj(x))."""
        d = x.shape[-1]
        v = F.linear(x, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        return self.out_proj(v)


class MLP(nn.Sequential):
    """c_fc -> activation -> c_proj: (..., width) -> (..., width)."""

    def __init__(self, width: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act()
        self.c_proj = nn.Linear(hidden, width)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)); (B, N, D) -> (B, N, D)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); `causal` lets position i attend to 0..i only."""
        x = x + self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_value_path(self, x: torch.Tensor) -> torch.Tensor:
        """The block with attention replaced by its value path (every token attends only to itself; MaskCLIP):
        (B, N, D) -> (B, N, D)."""
        x = x + self.attn.value_path(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`layers` residual attention blocks of one width (the image and text towers' trunk)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False, upto: int | None = None) -> torch.Tensor:
        """x: (B, N, D). `upto` runs only the first `upto` blocks (used for dense features)."""
        for block in self.resblocks[:upto]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def init_weights(self) -> None:
        """OpenAI's text-transformer initialisation (as open_clip's), scaled by depth. Only the text tower uses it:
        open_clip leaves its ViT blocks at PyTorch's defaults."""
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def activation(quick_gelu: bool) -> type[nn.Module]:
    """The MLP activation class: QuickGELU (OpenAI's weights) or exact GELU."""
    return QuickGELU if quick_gelu else nn.GELU
