"""Transformer building blocks whose parameter names match OpenAI's and open_clip's weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 weights stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's sigmoid approximation of GELU; the original CLIP weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def attend_one_query(
    q: torch.Tensor,
    x: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    heads: int,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention of one (projected) query per sequence over keys x W_k^T + b_k and values x W_v^T + b_v,
    without projecting every position: q (B, D), x (B, N, D) -> (B, D), heads concatenated.

    Per head h, q_h . k_j = (W_k,h^T q_h) . x_j + q_h . b_k,h, and sum_j a_j v_j = W_v,h (sum_j a_j x_j) + b_v,h
    because the weights sum to one. That is O(D^2 + N D) per sequence instead of O(N D^2): the same function in a
    different order. (The key-bias term is the same for every j, so the softmax ignores it; it is kept so that the
    key bias still takes part, with its exactly-zero gradient, as DDP expects of every parameter.)"""
    b, n, d = x.shape
    head_dim = d // heads
    q = q.view(b, heads, head_dim).transpose(0, 1) * head_dim**-0.5  # (H, B, hd)
    q_in_x = torch.bmm(q, k_weight.view(heads, head_dim, d)).transpose(0, 1)  # (B, H, D): W_k,h^T q_h
    q_dot_bias = (q * k_bias.view(heads, 1, head_dim)).sum(-1).transpose(0, 1)  # (B, H)
    scores = torch.bmm(q_in_x, x.transpose(1, 2)) + q_dot_bias[..., None]  # (B, H, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    pooled = torch.bmm(scores.softmax(dim=-1), x)  # (B, H, D): attention-weighted inputs, per head
    out = torch.bmm(pooled.transpose(0, 1), v_weight.view(heads, head_dim, d).transpose(1, 2))  # (H, B, hd)
    return out.transpose(0, 1).reshape(b, d) + v_bias


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

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> three (B, H, N, D/H) tensors."""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output at one query position per sequence: x (B, N, D), rows (B,) -> (B, D).

        key_mask (B, N) bool, True where a key may be attended to (the causal mask of a single query row)."""
        b, _, d = x.shape
        query = x[torch.arange(b, device=x.device), rows]  # (B, D)
        q = F.linear(query, self.in_proj_weight[:d], self.in_proj_bias[:d])
        w_k, b_k = self.in_proj_weight[d : 2 * d], self.in_proj_bias[d : 2 * d]
        w_v, b_v = self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :]
        out = attend_one_query(q, x, w_k, b_k, w_v, b_v, self.heads, key_mask)
        return self.out_proj(out)

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """Output when every token attends only to itself (MaskCLIP): out_proj(v_proj(x))."""
        d = x.shape[-1]
        v = F.linear(x, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        return self.out_proj(v)


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act()
        self.c_proj = nn.Linear(hidden, width)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output at position rows[b] of each sequence, (B, D): the same numbers as forward()[b, rows[b]]
        for a fraction of the work (every position still serves as key and value; the MLP runs on B rows only)."""
        attended = self.attn.forward_rows(self.ln_1(x), rows, key_mask)  # (B, D)
        y = x[torch.arange(x.shape[0], device=x.device), rows] + attended
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
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

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Output at one position per sequence after all blocks, (B, D): the pooled token (ViT's class token, the
        text's EOT) is all a pooled embedding needs, so the last block computes only that row (~7% fewer FLOPs for
        12 layers)."""
        x = self(x, causal=causal, upto=self.layers - 1)
        key_mask = None
        if causal:  # the query at rows[b] sees keys 0..rows[b]
            key_mask = torch.arange(x.shape[1], device=x.device) <= rows[:, None]  # (B, N)
        return self.resblocks[-1].forward_rows(x, rows, key_mask)

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
    return QuickGELU if quick_gelu else nn.GELU
