"""Exact inference speedups for the towers, all in one place (in the spirit of timm's `reparameterize_model`).

The towers' `forward` methods are the textbook definitions (full sequence, SDPA, gather at the pooled token,
Conv -> BatchNorm): what training runs, what `torch.compile` sees, what a reader meets first. The functions here
compute the same outputs, to float rounding (tests/test_inference_paths.py: 1e-5 against the plain path), for less
work. `CLIP.encode_image` / `encode_text` / `encode_image_tokens` take them when `fast_path_applies`: autograd off
(`torch.no_grad()` / `torch.inference_mode()`) and the tower in eval mode, which is how every library encoder runs
(`clip_pacl.encode`: evaluation, the index, zero-shot, the server). `CLIP.forward` (training) never does, and ONNX
export (`checkpoint/onnx.py`) uses the tricks that trace to a fixed graph (1 and 4; `encode_text(..., trim=False)`).

1. Last-block single-row attention (ViT class token, text EOT, ResNet attention pool's mean token): a pooled
   embedding needs one row of the last attention, so `attend_one_query` never projects every key and value. Per
   head, q . k_j = (W_k^T q) . x_j + q . b_k and sum_j a_j v_j = W_v (sum_j a_j x_j) + b_v (the weights sum to
   one); q . b_k is the same for every key, so the softmax ignores it. O(D^2 + N D) per sequence instead of
   O(N D^2); the last MLP runs on one row. About 7% fewer FLOPs for a 12-layer ViT.
2. EOT trimming (text): the mask is causal, so the output at a row's EOT does not depend on the padding after it;
   running only up to the batch's longest EOT is exact, and captions are far shorter than the 77-token context.
   (One host sync: the trimmed length.)
3. Length grouping (text): `length_groups` splits a batch of very different lengths into groups that are each
   trimmed to their own longest EOT (an exact dynamic programme over padded tokens; one `.tolist()` sync).
4. BatchNorm folding (ResNet): eval-mode BatchNorm after a convolution is conv(x, w * s) + (beta - mean * s) with
   s = gamma / sqrt(var + eps): one pass over the activations instead of two, with weights kept channels-last
   (the layout oneDNN's CPU convolutions run fastest in) and ReLUs in place. The folded weights are cached per
   model and rebuilt when any source tensor changes (an optimizer step, `load_state_dict`, `.to()` all change a
   tensor's version, storage or dtype); a model whose weights were created under `torch.inference_mode()` has no
   version counters, so it is folded afresh on every call instead.
5. oneDNN linear layers (transformer blocks): `F.linear` on a float32 CPU tensor runs the BLAS sgemm PyTorch was
   built with (MKL), which on AMD CPUs takes a generic code path; oneDNN's own JIT kernels
   (`torch.ops.mkldnn._linear_pointwise`, what `torch.compile` uses for frozen CPU linears) run AVX-512 on any x86
   CPU, about 2.2x MKL's rate on the AMD EPYC we measured (benchmarks/encode.py; on Intel CPUs the two are close),
   and add the bias and the exact GELU in the same pass. Same products and sums in another order (1e-5). Not under
   tracing (ONNX export keeps standard ops), not for other dtypes or devices. The blocks run as `_block` writes them
   (the textbook block with these linears); an int8 model's layers (`models/quantize.py`) run as themselves, so
   tricks 1-3 apply to int8 models too.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.models.layers import MLP, Attention, ResidualAttentionBlock, Transformer
from clip_pacl.models.resnet import Bottleneck, ModifiedResNet
from clip_pacl.models.text import TextTransformer
from clip_pacl.models.vit import VisionTransformer

# What one extra call of the text tower costs, in padded tokens (trick 3). On CPU, compute dominates but every call
# adds thread synchronisation that a busy machine makes expensive: split only where it saves a few hundred tokens
# (a batch of COCO-length captions stays whole, a batch mixing short and long text does not). On GPUs a call is
# bound by kernel launches until it holds thousands of tokens.
GROUP_OVERHEAD_TOKENS = {"cpu": 256}


def fast_path_applies(tower: nn.Module) -> bool:
    """True when the speedups are exact and free: no autograd, eval mode (BatchNorm uses its running statistics),
    and not inside `torch.compile` (whose graph would break at the host syncs)."""
    return not torch.is_grad_enabled() and not tower.training and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------- 5. oneDNN linears
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


def linear(layer: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """`layer(x)` (then exact GELU) for an `nn.Linear` (by `dense`) or an int8 layer (as itself)."""
    if type(layer) is nn.Linear:
        return dense(x, layer.weight, layer.bias, gelu)
    y = layer(x)
    return F.gelu(y) if gelu else y


def _mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    if type(mlp.gelu) is nn.GELU and mlp.gelu.approximate == "none":
        return linear(mlp.c_proj, linear(mlp.c_fc, x, gelu=True))
    return linear(mlp.c_proj, mlp.gelu(linear(mlp.c_fc, x)))


def _in_projection(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    if type(attn) is Attention:
        return dense(x, attn.in_proj_weight, attn.in_proj_bias)
    return attn.in_projection(x)


def _block(block: ResidualAttentionBlock, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """`block(x, causal)` (B, N, D) -> (B, N, D) with trick 5's linears."""
    attn = block.attn
    b, n, d = x.shape
    qkv = _in_projection(attn, block.ln_1(x)).view(b, n, 3, attn.heads, d // attn.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D/H) each
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    x = x + linear(attn.out_proj, out.transpose(1, 2).reshape(b, n, d))
    return x + _mlp(block.mlp, block.ln_2(x))


def run_blocks(transformer: Transformer, x: torch.Tensor, causal: bool, upto: int | None = None) -> torch.Tensor:
    """`transformer(x, causal, upto)` (B, N, D) -> (B, N, D) with trick 5's linears."""
    for block in transformer.resblocks[:upto]:
        x = _block(block, x, causal)
    return x


# ---------------------------------------------------------------------------------------------- 1. one-row attention
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


def transformer_row(transformer: Transformer, x: torch.Tensor, rows: torch.Tensor, causal: bool) -> torch.Tensor:
    """`transformer(x, causal)[b, rows[b]]` (B, D) with the last block computed for that row only."""
    x = run_blocks(transformer, x, causal, upto=transformer.layers - 1)  # (B, N, D)
    block = transformer.resblocks[-1]
    b, n, d = x.shape
    batch = torch.arange(b, device=x.device)
    h = block.ln_1(x)
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = dense(h[batch, rows], weight[:d], bias[:d])  # (B, D)
    key_mask = torch.arange(n, device=x.device) <= rows[:, None] if causal else None  # (B, N)
    attended = attend_one_query(q, h, weight[d : 2 * d], weight[2 * d :], bias[2 * d :], block.attn.heads, key_mask)
    y = x[batch, rows] + linear(block.attn.out_proj, attended)  # (B, D)
    return y + _mlp(block.mlp, block.ln_2(y))


# ---------------------------------------------------------------------------------------------- 2, 3. text
def length_groups(lengths: torch.Tensor, overhead_tokens: int = 256) -> list[torch.Tensor]:
    """Indices of the batch split into groups of similar sequence length.

    Minimises the padded token count, sum over groups of (rows x longest length), plus `overhead_tokens` per group
    (a group's fixed cost: more calls, smaller matrix products); an exact dynamic programme over the distinct
    lengths (at most the context length, 77). A batch of equal lengths stays one group."""
    values, counts = torch.unique(lengths, return_counts=True)  # sorted ascending
    if len(values) <= 1:
        return [torch.arange(len(lengths), device=lengths.device)]
    values, counts = values.tolist(), counts.tolist()
    rows_before = [0]
    for count in counts:
        rows_before.append(rows_before[-1] + count)
    best = [0.0] + [math.inf] * len(values)  # best[j]: cost of the j shortest distinct lengths
    start = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        for i in range(j):
            cost = best[i] + (rows_before[j] - rows_before[i]) * values[j - 1] + overhead_tokens
            if cost < best[j]:
                best[j], start[j] = cost, i
    bounds, j = [], len(values)
    while j > 0:
        bounds.append((values[start[j]], values[j - 1]))
        j = start[j]
    return [torch.nonzero((lengths >= low) & (lengths <= high)).flatten() for low, high in reversed(bounds)]


def _text_pooled(tower: TextTransformer, text: torch.Tensor, eot: torch.Tensor, trim: bool) -> torch.Tensor:
    if trim:  # trick 2
        text = text[:, : int(eot.max()) + 1 if eot.numel() else 1]
    x = transformer_row(tower.transformer, tower.embed(text), eot, causal=True)  # (B, width), at each EOT
    return tower.ln_final(x) @ tower.text_projection


def encode_text(tower: TextTransformer, text: torch.Tensor, trim: bool = True) -> torch.Tensor:
    """`tower(text)`: (B, L) token ids -> (B, output_dim). `trim=False` keeps the full context (trick 1 only), for a
    traced graph that must not depend on the example's length."""
    eot = text.argmax(dim=-1)  # (B,) the EOT token has the highest id
    if not trim:
        return _text_pooled(tower, text, eot, trim=False)
    groups = length_groups(eot + 1, GROUP_OVERHEAD_TOKENS.get(text.device.type, 2048))  # trick 3
    if len(groups) == 1:
        return _text_pooled(tower, text, eot, trim=True)
    pooled = torch.cat([_text_pooled(tower, text[group], eot[group], trim=True) for group in groups])
    return pooled[torch.argsort(torch.cat(groups))]


# ---------------------------------------------------------------------------------------------- 4. BatchNorm folding
def conv_bn_pairs(resnet: ModifiedResNet) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every (convolution, the BatchNorm right after it) of the ResNet."""
    pairs = [(resnet.conv1, resnet.bn1), (resnet.conv2, resnet.bn2), (resnet.conv3, resnet.bn3)]
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
            if block.downsample is not None:
                pairs.append((block.downsample[1], block.downsample[2]))
    return pairs


class FoldedConvs:
    """Channels-last convolutions with their BatchNorm folded in, built from the current parameters."""

    def __init__(self, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]):
        self.key = _version_key(pairs)
        self.weights: dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for conv, bn in pairs:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
                weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
                self.weights[conv] = (weight, bn.bias - bn.running_mean * scale)

    def __call__(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm(conv(x)) in one convolution: (B, C_in, H, W) -> (B, C_out, H', W')."""
        weight, bias = self.weights[conv]
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _version_key(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> tuple | None:
    """What identifies the current weights; None when they cannot be tracked (inference tensors)."""
    tensors = [t for conv, bn in pairs for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


_FOLDED: weakref.WeakKeyDictionary[ModifiedResNet, FoldedConvs] = weakref.WeakKeyDictionary()


def folded_convs(resnet: ModifiedResNet) -> FoldedConvs:
    """The folded convolutions for the ResNet's current weights (cached until a weight changes)."""
    pairs = conv_bn_pairs(resnet)
    cached = _FOLDED.get(resnet)
    if cached is not None and cached.key is not None and cached.key == _version_key(pairs):
        return cached
    _FOLDED[resnet] = folded = FoldedConvs(pairs)
    return folded


def _bottleneck(block: Bottleneck, x: torch.Tensor, folded: FoldedConvs) -> torch.Tensor:
    out = folded(block.conv1, x).relu_()
    out = folded(block.conv2, out).relu_()
    out = folded(block.conv3, block.avgpool(out))
    identity = x if block.downsample is None else folded(block.downsample[1], block.downsample[0](x))
    return out.add_(identity).relu_()


def resnet_feature_map(resnet: ModifiedResNet, image: torch.Tensor) -> torch.Tensor:
    """`resnet.feature_map(image)` (B, C, H/32, W/32) with BatchNorm folded into the convolutions."""
    folded = folded_convs(resnet)
    x = image.to(resnet.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)
    for conv in (resnet.conv1, resnet.conv2, resnet.conv3):
        x = folded(conv, x).relu_()
    x = resnet.avgpool(x)
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            x = _bottleneck(block, x, folded)
    return x


# ---------------------------------------------------------------------------------------------- the image tower
def encode_image(visual: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """`visual(image)`: (B, 3, H, W) -> (B, output_dim), by tricks 1 (ViT, ResNet) and 4 (ResNet)."""
    if isinstance(visual, VisionTransformer):
        x = visual.embed(image)
        rows = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the class token
        return visual.ln_post(transformer_row(visual.transformer, x, rows, causal=False)) @ visual.proj
    if isinstance(visual, ModifiedResNet):
        pool = visual.attnpool
        tokens = pool.tokens(resnet_feature_map(visual, image))  # (B, 1 + HW, C)
        q = pool.q_proj(tokens[:, 0])  # (B, C): the mean token
        return pool.c_proj(attend_one_query(q, tokens, pool.k_proj.weight, pool.v_proj.weight, pool.v_proj.bias,
                                            pool.num_heads))
    return visual(image)


def image_tokens(visual: nn.Module, image: torch.Tensor, mode: str) -> torch.Tensor:
    """`visual.forward_tokens(image)` or `visual.forward_maskclip(image)` (B, 1 + N, output_dim) (`mode` "tokens" or
    "maskclip"); the ResNet folds BatchNorm (trick 4), the ViT needs every row and takes trick 5."""
    if isinstance(visual, ModifiedResNet):
        fmap = resnet_feature_map(visual, image)
        return visual.attnpool.value_path(fmap) if mode == "maskclip" else visual.attnpool.forward_tokens(fmap)
    if isinstance(visual, VisionTransformer):
        layers = visual.transformer.layers
        x = run_blocks(visual.transformer, visual.embed(image), False, upto=layers - 1 if mode == "maskclip" else None)
        if mode == "maskclip":
            x = visual.transformer.resblocks[-1].forward_value_path(x)
        return visual.ln_post(x) @ visual.proj
    return visual.forward_maskclip(image) if mode == "maskclip" else visual.forward_tokens(image)
