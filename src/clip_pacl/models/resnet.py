"""OpenAI's ModifiedResNet image tower: 3-conv stem, anti-aliased bottlenecks, attention pooling.

Its inference path (`fast=True`, see `models/layers.py`) computes the same function with two exact tricks:

- BatchNorm folding: eval-mode BatchNorm after a convolution is conv(x, w * s) + (beta - mean * s) with
  s = gamma / sqrt(var + eps): one pass over the activations instead of two, with weights kept channels-last (the
  layout oneDNN's CPU convolutions run fastest in) and ReLUs in place. Each module with convolutions (the stem in
  `ModifiedResNet`, each `Bottleneck`) keeps its own `FoldedConvs`, rebuilt when any of its source tensors changes
  (an optimizer step, `load_state_dict`, `.to()` all change a tensor's version, storage or dtype); weights created
  under `torch.inference_mode()` have no version counters, so they are folded afresh on every call instead.
- One-row attention pooling: the pooled embedding is the mean token's row of the attention pool, by
  `attend_one_query` (`models/layers.py`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.config import VisionConfig
from clip_pacl.models.layers import attend_one_query, resize_grid_embedding


class FoldedConvs:
    """A module's (convolution, BatchNorm) pairs as channels-last convolutions with the BatchNorm folded in, built
    from the module's current weights and rebuilt when one changes. Not a parameter or buffer: never saved, and a
    copy of the module starts with an empty cache."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs  # (path of a convolution, path of the BatchNorm after it), relative to the owner
        self.key: tuple | None = None
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor, nn.Conv2d]] = {}

    def __deepcopy__(self, memo: dict) -> FoldedConvs:
        return FoldedConvs(self.pairs)

    def __getstate__(self) -> dict:
        return {"pairs": self.pairs, "key": None, "weights": {}}

    def current(self, owner: nn.Module) -> FoldedConvs:
        """Itself, folded again first if any of `owner`'s source tensors changed since the last fold (or cannot be
        tracked: inference tensors)."""
        modules = [(conv, owner.get_submodule(conv), owner.get_submodule(bn)) for conv, bn in self.pairs]
        tensors = [t for _, conv, bn in modules for t in (conv.weight, bn.weight, bn.bias, bn.running_mean,
                                                          bn.running_var)]
        key = None if any(t.is_inference() for t in tensors) else tuple(
            (t.data_ptr(), t._version, t.dtype) for t in tensors)
        if key is None or key != self.key:
            with torch.no_grad():
                for name, conv, bn in modules:
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
                    weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
                    self.weights[name] = (weight, bn.bias - bn.running_mean * scale, conv)
            self.key = key
        return self

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm(conv(x)) of the convolution at path `name`, in one convolution: (B, C_in, H, W) ->
        (B, C_out, H', W')."""
        weight, bias, conv = self.weights[name]
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
        self.folded = FoldedConvs(pairs + ([("downsample.0", "downsample.1")] if self.downsample is not None else []))

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 4 * planes, H / stride, W / stride); `fast`: BatchNorm folded into the
        convolutions (eval mode only)."""
        if fast:
            folded = self.folded.current(self)
            out = folded("conv1", x).relu_()
            out = folded("conv2", out).relu_()
            out = folded("conv3", self.avgpool(out))
            identity = x if self.downsample is None else folded("downsample.0", self.downsample[0](x))
            return out.add_(identity).relu_()
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
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return x + resize_grid_embedding(self.positional_embedding, self.spatial_dim, (h, w)).to(x.dtype)

    def attend(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of `queries` (B, Q, C) over `tokens` (B, T, C), through c_proj: (B, Q, output_dim)."""
        b, t, c = tokens.shape
        head_dim = c // self.num_heads
        q = self.q_proj(queries).view(b, -1, self.num_heads, head_dim).transpose(1, 2)  # (B, H, Q, hd)
        k = self.k_proj(tokens).view(b, t, self.num_heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = self.v_proj(tokens).view(b, t, self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, hd)
        return self.c_proj(out.transpose(1, 2).reshape(b, -1, c))

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Pooled (B, output_dim): the mean token queries every position; `fast`: by one-row attention, without
        projecting every key and value."""
        tokens = self.tokens(x)  # (B, 1 + HW, C)
        if fast:
            q = self.q_proj(tokens[:, 0])  # (B, C): the mean token
            return self.c_proj(attend_one_query(q, tokens, self.k_proj.weight, self.v_proj.weight, self.v_proj.bias,
                                                self.num_heads))
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
    With `fast=True` (inference, eval mode) BatchNorm is folded into the convolutions and `forward` pools by one-row
    attention (the module docstring).
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
        self.folded = FoldedConvs([("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")])
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

    def stem(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, width, H/4, W/4)."""
        x = x.to(self.conv1.weight.dtype)
        if fast:
            folded = self.folded.current(self)
            x = x.contiguous(memory_format=torch.channels_last)
            for conv in ("conv1", "conv2", "conv3"):
                x = folded(conv, x).relu_()
            return self.avgpool(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def feature_map(self, image: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 32 * width, H/32, W/32)."""
        x = self.stem(image, fast)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            elif fast:
                for block in layer:
                    x = block(x, fast=True)
            else:
                x = layer(x)
        return x

    def forward(self, image: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """Pooled embedding (B, output_dim)."""
        return self.attnpool(self.feature_map(image, fast), fast)

    def forward_tokens(self, image: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """(B, 1 + HW, output_dim): every position of the attention pool as a query over all positions (the analogue
        of the ViT's last-block tokens); index 0 is the pooled embedding."""
        return self.attnpool.forward_tokens(self.feature_map(image, fast))

    def forward_maskclip(self, image: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """MaskCLIP dense tokens (B, 1 + HW, output_dim): the attention pool's value path, c_proj(v_proj(x))."""
        return self.attnpool.value_path(self.feature_map(image, fast))

    def layer_groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """The tower from input to output in groups (LiT locking unlocks the last N; PACL's unfreeze_last_n_blocks
        trains the last N): [stem (three conv/BN pairs), layer1, layer2, layer3, layer4 + head (attnpool)]. The
        head goes with the last stage as the ViT's goes with its last block."""
        stem = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        return [stem, [self.layer1], [self.layer2], [self.layer3], [self.layer4, self.attnpool]]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass (training only) to save memory."""
        self.grad_checkpointing = enable
