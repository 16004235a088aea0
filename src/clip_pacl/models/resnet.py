"""OpenAI's ModifiedResNet image tower: 3-conv stem, anti-aliased bottlenecks, attention pooling."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.config import VisionConfig
from clip_pacl.models.layers import attend_one_query


class Bottleneck(nn.Module):
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
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        pairs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        return pairs + ([(self.downsample[1], self.downsample[2])] if self.downsample is not None else [])

    def forward_folded(self, x: torch.Tensor, folded: FoldedConvs) -> torch.Tensor:
        """forward() with BatchNorm folded into the convolutions (inference only: activations are updated in place)."""
        out = folded(self.conv1, x).relu_()
        out = folded(self.conv2, out).relu_()
        out = folded(self.conv3, self.avgpool(out))
        identity = x if self.downsample is None else folded(self.downsample[1], self.downsample[0](x))
        return out.add_(identity).relu_()


class FoldedConvs:
    """Eval-mode BatchNorm folded into the preceding convolution: conv(x, w * s) + (beta - mean * s) with
    s = gamma / sqrt(var + eps), the same function with one pass over the activations instead of two. Weights are
    kept channels-last, the layout oneDNN's CPU convolutions run fastest in.

    Built from the current parameters; `is_current` tells whether any of them has changed since (an optimizer
    step, load_state_dict, .to() all bump a tensor's version or replace it)."""

    def __init__(self, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]):
        self._key = self.key(pairs)
        self._weights: dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for conv, bn in pairs:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
                weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
                self._weights[conv] = (weight, bn.bias - bn.running_mean * scale)

    @staticmethod
    def key(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> tuple:
        tensors = [t for conv, bn in pairs for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def is_current(self, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> bool:
        return self._key == self.key(pairs)

    def __call__(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weights[conv]
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class AttentionPool2d(nn.Module):
    """QKV attention pooling where the query is the mean of the feature map."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.spatial_dim = spatial_dim
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (B, output_dim). Only the mean token queries, which is all the output needs."""
        x = self._tokens(x)  # (B, 1 + HW, C)
        q = self.q_proj(x[:, 0])  # (B, C)
        k, v = self.k_proj, self.v_proj
        out = attend_one_query(q, x, k.weight, k.bias, v.weight, v.bias, self.num_heads)  # (B, C)
        return self.c_proj(out)

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """Every position through the value and output projections (MaskCLIP): (B, 1 + HW, output_dim)."""
        return self.c_proj(self.v_proj(self._tokens(x)))


class ModifiedResNet(nn.Module):
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
        self._folded: FoldedConvs | None = None
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
        return self.attnpool.c_proj.out_features

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def train(self, mode: bool = True) -> ModifiedResNet:
        self._folded = None  # training changes the weights and uses batch statistics
        return super().train(mode)

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        pairs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                pairs += block.conv_bn_pairs()
        return pairs

    def folded_convs(self) -> FoldedConvs:
        """The BatchNorm-folded convolutions for the current weights (rebuilt only when a weight has changed)."""
        pairs = self.conv_bn_pairs()
        if self._folded is None or not self._folded.is_current(pairs):
            self._folded = FoldedConvs(pairs)
        return self._folded

    def _feature_map_folded(self, image: torch.Tensor) -> torch.Tensor:
        folded = self.folded_convs()
        x = image.to(self.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = folded(conv, x).relu_()
        x = self.avgpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block.forward_folded(x, folded)
        return x

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 32 * width, H/32, W/32).

        In eval mode without autograd (inference), BatchNorm is folded into channels-last convolutions: the same
        outputs (to float rounding) for about a fifth less CPU time (benchmarks/encode.py measures it)."""
        if not self.training and not torch.is_grad_enabled():
            return self._feature_map_folded(image)
        x = self.stem(image)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.feature_map(image))

    def forward_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1 + HW, output_dim): index 0 is the attention-pooled embedding, then each position's value path."""
        fmap = self.feature_map(image)
        tokens = self.attnpool.value_path(fmap)
        return torch.cat([self.attnpool(fmap)[:, None], tokens[:, 1:]], dim=1)

    forward_maskclip = forward_tokens
