"""OpenAI's ModifiedResNet image tower: 3-conv stem, anti-aliased bottlenecks, attention pooling."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.config import VisionConfig


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool) -> 1x1 convs with BatchNorm, plus a (pooled, projected) shortcut: (B, C_in, H, W) ->
    (B, 4 * planes, H / stride, W / stride)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # All convs have stride 1; an avgpool after the second conv does the striding (anti-aliasing).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling where the query is the mean of the feature map: (B, C, H, W) -> (B, output_dim)."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + HW, C): mean token then positions, plus positional embedding."""
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        pos = self.positional_embedding
        if h * w + 1 != pos.shape[0]:
            n = self.spatial_dim
            grid = pos[1:].reshape(1, n, n, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, c)])
        return x + pos.to(x.dtype)

    def attend(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of `queries` (B, Q, C) over `tokens` (B, T, C), through c_proj: (B, Q, output_dim)."""
        b, t, c = tokens.shape
        head_dim = c // self.num_heads
        q = self.q_proj(queries).view(b, -1, self.num_heads, head_dim).transpose(1, 2)  # (B, H, Q, hd)
        k = self.k_proj(tokens).view(b, t, self.num_heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = self.v_proj(tokens).view(b, t, self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, hd)
        return self.c_proj(out.transpose(1, 2).reshape(b, -1, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (B, output_dim): the mean token queries every position."""
        tokens = self.tokens(x)  # (B, 1 + HW, C)
        return self.attend(tokens, tokens[:, :1])[:, 0]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every position queries every position (B, 1 + HW, output_dim); index 0 equals `forward`."""
        tokens = self.tokens(x)
        return self.attend(tokens, tokens)

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """Every position through the value and output projections (MaskCLIP): (B, 1 + HW, output_dim)."""
        return self.c_proj(self.v_proj(self.tokens(x)))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem, four stages of anti-aliased bottlenecks (total stride 32), attention pooling.

    `forward` (B, 3, H, W) -> (B, output_dim); `forward_tokens` / `forward_maskclip` -> (B, 1 + HW/1024, output_dim).
    """

    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)
        self.grad_checkpointing = False
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                nn.init.zeros_(block.bn3.weight)

    @property
    def output_dim(self) -> int:
        """The joint embedding width D."""
        return self.attnpool.c_proj.out_features

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, width, H/4, W/4)."""
        x = x.to(self.conv1.weight.dtype)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 32 * width, H/32, W/32)."""
        x = self.stem(image)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, output_dim)."""
        return self.attnpool(self.feature_map(image))

    def forward_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1 + HW, output_dim): every position of the attention pool as a query over all positions (the analogue
        of the ViT's last-block tokens); index 0 is the pooled embedding."""
        return self.attnpool.forward_tokens(self.feature_map(image))

    def forward_maskclip(self, image: torch.Tensor) -> torch.Tensor:
        """MaskCLIP dense tokens (B, 1 + HW, output_dim): the attention pool's value path, c_proj(v_proj(x))."""
        return self.attnpool.value_path(self.feature_map(image))
