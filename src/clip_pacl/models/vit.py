"""OpenAI-style Vision Transformer image tower (parameter names as in OpenAI's and open_clip's weights)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.config import VisionConfig
from clip_pacl.models.layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """Patchify (conv1), prepend a class token, add positions, transformer, then ln_post and the projection.

    `forward` (B, 3, H, W) -> (B, output_dim) pools at the class token; `forward_tokens` keeps every token.
    """

    def __init__(self, cfg: VisionConfig, output_dim: int, act: type[nn.Module]):
        super().__init__()
        width, grid = cfg.width, cfg.grid_size
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        # The blocks keep PyTorch's default init, as open_clip's ViT does (OpenAI never defined one): the text
        # tower's depth-scaled init trains a small ViT markedly worse (issue 10; tests/test_init.py).

    @property
    def output_dim(self) -> int:
        """The joint embedding width D."""
        return self.proj.shape[1]

    def pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positional embedding for a (grid_h, grid_w) patch grid, bicubically resized when it differs."""
        pos = self.positional_embedding
        n = self.cfg.grid_size
        if (grid_h, grid_w) == (n, n):
            return pos
        patch_pos = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, width): class token then patches, after ln_pre."""
        x = self.conv1(image)  # (B, width, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(gh, gw).to(x.dtype)
        return self.ln_pre(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, output_dim): the class token through ln_post and the projection."""
        x = self.transformer(self.embed(image))  # (B, 1 + N, width)
        return self.ln_post(x[:, 0]) @ self.proj

    def forward_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Every token in the joint space (B, 1 + N, output_dim); index 0 is the pooled embedding."""
        x = self.transformer(self.embed(image))
        return self.ln_post(x) @ self.proj

    def forward_maskclip(self, image: torch.Tensor) -> torch.Tensor:
        """MaskCLIP dense tokens (B, 1 + N, output_dim): the last block's attention replaced by its value path."""
        x = self.transformer(self.embed(image), upto=self.cfg.layers - 1)
        x = self.transformer.resblocks[-1].forward_value_path(x)  # (B, 1 + N, width)
        return self.ln_post(x) @ self.proj
