"""Transformer building blocks whose parameter names match OpenAI's and open_clip's weights.

Each block's `forward` is the textbook definition: what training runs, what `torch.compile` sees. With `fast=True`
(what `CLIP.encode_*` pass when `fast_path_applies`: no autograd, eval mode, not compiling) the same block computes
the same function, to float rounding (tests/test_inference_paths.py: 1e-5), for less work. The tricks live beside
the code they speed up:

- oneDNN linear layers (`dense`, `Linear.forward_fast`; every block's linears): here.
- One-row attention (`attend_one_query`, `Attention.forward_row`, `ResidualAttentionBlock.forward_row`,
  `Transformer.forward_row`; the ViT's class token, the text tower's EOT): here; the ResNet's attention pool uses
  `attend_one_query` for its mean token (`models/resnet.py`).
- EOT trimming and length grouping: `models/text.py`. BatchNorm folding: `models/resnet.py`.

An int8 model (`models/quantize.py`) takes the same paths: its `Int8Linear` / `Int8Attention` offer the same
methods (`forward_fast`, `in_projection(x, fast)`) and run int8 kernels in them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def fast_path_applies(tower: nn.Module) -> bool:
    """True when a tower's `fast=True` path is exact and free: no autograd, eval mode (BatchNorm uses its running
    statistics), and not inside `torch.compile` (whose graph would break at the text tower's host syncs)."""
    return not torch.is_grad_enabled() and not tower.training and not torch.compiler.is_compiling()


# oneDNN linear layers. `F.linear` on a float32 CPU tensor runs the BLAS sgemm PyTorch was built with (MKL);
# oneDNN's own JIT kernels (`torch.ops.mkldnn._linear_pointwise`, what `torch.compile` uses for frozen CPU linears)
# pick their code by the CPU's instruction sets, not its vendor, and add the bias and the exact GELU in the same
# pass. The rule, oneDNN wherever PyTorch has it, stands on measurements (`benchmarks/linear_kernels.py`; README
# "Performance (CPU)": as fast as MKL or faster on every CPU kind timed, twice as fast on one). Weights prepacked
# into oneDNN's blocked layout were measured too and are not used (a few percent, for a second copy of every weight).
# Same products and sums in another order (1e-5). Not under tracing (ONNX export keeps standard ops), not for other
# dtypes or devices.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)` (then exact GELU): (..., in) -> (..., out), by oneDNN where it applies."""
    if not (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.jit.is_tracing()):
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "gelu" if gelu else "none", [],
                                           "none" if gelu else "")
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same `forward`) that also runs by oneDNN with an exact GELU fused in
    (`forward_fast`); `Int8Linear` offers the same two methods."""

    def forward_fast(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """`self(x)`, then exact GELU when `gelu`: (..., in) -> (..., out), by `dense`."""
        return dense(x, self.weight, self.bias, gelu)


# One-row attention. A pooled embedding needs one row of the last attention (the ViT's class token, the text
# tower's EOT, the ResNet attention pool's mean token), so `attend_one_query` never projects every key and value.
# Per head, q . k_j = (W_k^T q) . x_j + q . b_k and sum_j a_j v_j = W_v (sum_j a_j x_j) + b_v (the weights sum to
# one); q . b_k is the same for every key, so the softmax ignores it. O(D^2 + N D) per sequence instead of
# O(N D^2); the last MLP runs on one row.
def attend_one_query(q: torch.Tensor, x: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                     v_bias: torch.Tensor, heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of one projected query per sequence over keys x W_k^T (+ b_k, which cancels) and values
    x W_v^T + b_v, without projecting every position: q (B, D), x (B, N, D) -> (B, D), heads concatenated.

    key_mask (B, N) bool, True where a key may be attended to (a causal row's prefix)."""
    b, n, d = x.shape
    head_dim = d // heads
    q = q.view(b, heads, head_dim).transpose(0, 1) * head_dim**-0.5  # (H, B, hd)
    q_in_x = torch.bmm(q, k_weight.view(heads, head_dim, d)).transpose(0, 1)  # (B, H, D): W_k,h^T q_h
    scores = torch.bmm(q_in_x, x.transpose(1, 2))  # (B, H, N)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    pooled = torch.bmm(scores.softmax(dim=-1), x)  # (B, H, D): attention-weighted inputs, per head
    out = torch.bmm(pooled.transpose(0, 1), v_weight.view(heads, head_dim, d).transpose(1, 2))  # (H, B, hd)
    return out.transpose(0, 1).reshape(b, d) + v_bias


def resize_grid_embedding(pos: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """A positional embedding (1 + grid^2, D) (one leading token, then a grid x grid raster) for a (h, w) grid:
    (1 + h w, D), the raster bicubically resized when the size differs (the ViT's patches, the ResNet attention
    pool's positions)."""
    h, w = size
    if (h, w) == (grid, grid):
        return pos
    raster = pos[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, D, grid, grid)
    raster = F.interpolate(raster, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], raster.permute(0, 2, 3, 1).reshape(h * w, -1)])


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
        self.out_proj = Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def in_projection(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Queries, keys and values side by side: (..., D) -> (..., 3D); `fast`: by `dense`."""
        if fast:
            return dense(x, self.in_proj_weight, self.in_proj_bias)
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def qkv(self, x: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> three (B, H, N, D/H) tensors."""
        b, n, d = x.shape
        qkv = self.in_projection(x, fast).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None,
                fast: bool = False) -> torch.Tensor:
        """Self-attention over every position: (B, N, D) -> (B, N, D); `fast`: the linears by oneDNN."""
        b, n, d = x.shape
        q, k, v = self.qkv(x, fast)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.out_proj.forward_fast(out) if fast else self.out_proj(out)

    def forward_row(self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """`self(x, causal)[b, rows[b]]` (B, D) by one-row attention (`attend_one_query`): x (B, N, D), rows (B,)."""
        b, n, d = x.shape
        weight, bias = self.in_proj_weight, self.in_proj_bias  # read once: an int8 layer dequantizes on each read
        q = dense(x[torch.arange(b, device=x.device), rows], weight[:d], bias[:d])  # (B, D)
        key_mask = torch.arange(n, device=x.device) <= rows[:, None] if causal else None  # (B, N)
        attended = attend_one_query(q, x, weight[d : 2 * d], weight[2 * d :], bias[2 * d :], self.heads, key_mask)
        return self.out_proj.forward_fast(attended)

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """Output when every token attends only to itself (MaskCLIP): out_proj(v_proj(x))."""
        d = x.shape[-1]
        v = F.linear(x, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        return self.out_proj(v)


class MLP(nn.Sequential):
    """c_fc -> activation -> c_proj: (..., width) -> (..., width)."""

    def __init__(self, width: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.c_fc = Linear(width, hidden)
        self.gelu = act()
        self.c_proj = Linear(hidden, width)

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """(..., width) -> (..., width); `fast`: the linears by oneDNN, an exact GELU fused into the first."""
        if not fast:
            return self.c_proj(self.gelu(self.c_fc(x)))
        if isinstance(self.gelu, nn.GELU) and self.gelu.approximate == "none":
            return self.c_proj.forward_fast(self.c_fc.forward_fast(x, gelu=True))
        return self.c_proj.forward_fast(self.gelu(self.c_fc.forward_fast(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)); (B, N, D) -> (B, N, D)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None,
                fast: bool = False) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); `causal` lets position i attend to 0..i only; `fast`: the linears by oneDNN."""
        x = x + self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask, fast=fast)
        return x + self.mlp(self.ln_2(x), fast=fast)

    def forward_row(self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """`self(x, causal)[b, rows[b]]` (B, D), computed for that row only (one-row attention, one-row MLP)."""
        y = x[torch.arange(x.shape[0], device=x.device), rows] + self.attn.forward_row(self.ln_1(x), rows, causal)
        return y + self.mlp(self.ln_2(y), fast=True)

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

    def forward(self, x: torch.Tensor, causal: bool = False, upto: int | None = None,
                fast: bool = False) -> torch.Tensor:
        """x: (B, N, D). `upto` runs only the first `upto` blocks (used for dense features); `fast`: each block's
        linears by oneDNN."""
        for block in self.resblocks[:upto]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal, fast=fast)
        return x

    def forward_row(self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """`self(x, causal)[b, rows[b]]` (B, D): the blocks on the fast path, the last one for that row only."""
        x = self(x, causal, upto=self.layers - 1, fast=True)  # (B, N, D)
        return self.resblocks[-1].forward_row(x, rows, causal)

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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only) to save memory."""
        self.grad_checkpointing = enable


def activation(quick_gelu: bool) -> type[nn.Module]:
    """The MLP activation class: QuickGELU (OpenAI's weights) or exact GELU."""
    return QuickGELU if quick_gelu else nn.GELU
