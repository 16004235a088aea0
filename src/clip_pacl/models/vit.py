"""OpenAI-style Vision Transformer image tower (parameter names as in OpenAI's and open_clip's weights)."""

from __future__ import annotations

import torch
from torch import nn

from clip_pacl.config import VisionConfig
from clip_pacl.models.layers import LayerNorm, Transformer, resize_grid_embedding


class VisionTransformer(nn.Module):
    """Patchify (conv1), prepend a class token, add positions, transformer, then ln_post and the projection.

    `forward` (B, 3, H, W) -> (B, output_dim) pools at the class token; `forward_tokens` keeps every token. With
    `fast=True` (inference, see `models/layers.py`) the blocks' linears run by oneDNN and `forward` computes the last
    block for the class token only.
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
        """Positional embedding (1 + grid_h * grid_w, width) for a (grid_h, grid_w) patch grid, bicubically resized
        when it differs from the trained one."""
        return resize_grid_embedding(self.positional_embedding, self.cfg.grid_size, (grid_h, grid_w))

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, width): class token then patches, after ln_pre."""
        x = self.conv1(image)  # (B, width, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(gh, gw).to(x.dtype)
        return self.ln_pre(x)

    def forward(self, image: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Pooled embedding (B, output_dim): the class token through ln_post and the projection."""
        x = self.embed(image)  # (B, 1 + N, width)
        if fast:  # the last block for the class token only
            cls = self.transformer.forward_row(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
            return self.ln_post(cls) @ self.proj
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj

    def forward_tokens(self, image: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Every token in the joint space (B, 1 + N, output_dim); index 0 is the pooled embedding."""
        x = self.transformer(self.embed(image), fast=fast)
        return self.ln_post(x) @ self.proj

    def forward_maskclip(self, image: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """MaskCLIP dense tokens (B, 1 + N, output_dim): the last block's attention replaced by its value path."""
        x = self.transformer(self.embed(image), upto=self.cfg.layers - 1, fast=fast)
        x = self.transformer.resblocks[-1].forward_value_path(x)  # (B, 1 + N, width)
        return self.ln_post(x) @ self.proj

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """The tower from input to output in groups (LiT locking unlocks the last N; PACL's unfreeze_last_n_blocks
        trains the last N): [stem (conv1, embeddings, ln_pre), block 0, ..., block n-2, block n-1 + head (ln_post,
        proj)]."""
        blocks = list(self.transformer.resblocks)
        stem = [self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre]
        return [stem, *[[b] for b in blocks[:-1]], [blocks[-1], self.ln_post, self.proj]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only) to save memory."""
        self.transformer.set_grad_checkpointing(enable)
