"""The towers' inference paths (`fast=True`) compute the same function as their plain forward.

- ViT / text: the last block evaluates only the pooled row (class token, EOT), with attention from one query
  (`attend_one_query`, `Transformer.forward_row`); the text tower trims to the longest EOT and encodes groups of
  similar length separately (`models/text.py`).
- ResNet: BatchNorm folded into the convolutions, cached per module until a weight changes; one-query attention
  pooling (`models/resnet.py`).
- Transformer blocks: linear layers by oneDNN (`dense`), bias and exact GELU in the same pass (`models/layers.py`).
- `encode_*` takes them under no_grad in eval mode; `forward` (training) and autograd never do.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.formats.onnx import TextEncoder
from clip_pacl.models import layers
from clip_pacl.models.layers import attend_one_query
from clip_pacl.models.text import length_groups

TOL = 1e-5


def full_text_reference(text_tower, tokens: torch.Tensor) -> torch.Tensor:
    """All 77 positions, every block on every row, explicit causal mask, pool at EOT."""
    x = text_tower.token_embedding(tokens) + text_tower.positional_embedding
    mask = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
    for block in text_tower.transformer.resblocks:
        x = x + block.attn(block.ln_1(x), attn_mask=mask)
        x = x + block.mlp(block.ln_2(x))
    pooled = x[torch.arange(tokens.shape[0]), tokens.argmax(-1)]
    return text_tower.ln_final(pooled) @ text_tower.text_projection


def tokens_with_lengths(lengths: list[int], context: int = 77) -> torch.Tensor:
    tokens = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, 0] = 49406
        tokens[row, 1 : length - 1] = torch.randint(1, 49000, (length - 2,))
        tokens[row, length - 1] = 49407
    return tokens


def test_attend_one_query_equals_projected_attention():
    b, n, d, heads = 3, 11, 64, 4
    x, q = torch.randn(b, n, d), torch.randn(b, d)
    w_k, w_v = torch.randn(d, d) * d**-0.5, torch.randn(d, d) * d**-0.5  # unit-variance outputs, as in a model
    b_k, b_v = torch.randn(d), torch.randn(d)  # the key bias cancels in the softmax: attend_one_query never sees it
    key_mask = torch.arange(n) <= torch.tensor([0, 5, 10])[:, None]  # (B, N)
    k = F.linear(x, w_k, b_k).view(b, n, heads, -1).transpose(1, 2)
    v = F.linear(x, w_v, b_v).view(b, n, heads, -1).transpose(1, 2)
    for mask in (None, key_mask):
        sdpa_mask = None if mask is None else mask[:, None, None, :]
        expected = F.scaled_dot_product_attention(q.view(b, heads, 1, -1), k, v, attn_mask=sdpa_mask).reshape(b, d)
        assert (attend_one_query(q, x, w_k, w_v, b_v, heads, mask) - expected).abs().max() < TOL


def test_length_groups_partition_the_batch():
    lengths = torch.tensor([5] * 32 + [70] * 32)[torch.randperm(64)]
    groups = length_groups(lengths)
    assert len(groups) == 2
    assert sorted(torch.cat(groups).tolist()) == list(range(64))
    assert [set(lengths[g].tolist()) for g in groups] == [{5}, {70}]
    assert len(length_groups(torch.full((50,), 12))) == 1
    assert len(length_groups(torch.tensor([3, 4]))) == 1  # not worth a second call
    assert len(length_groups(torch.tensor([], dtype=torch.long))) == 1


def test_text_plain_forward_is_the_full_computation():
    model = clip_pacl.load("tiny").eval()
    tokens = tokens_with_lengths([3, 9, 40, 77])
    with torch.no_grad():
        assert (model.text(tokens) - full_text_reference(model.text, tokens)).abs().max() < TOL


def test_text_fast_path_equals_plain_for_mixed_lengths():
    model = clip_pacl.load("tiny").eval()
    tokens = tokens_with_lengths([3, 4, 6, 9, 12, 20, 33, 50, 77] * 4)
    assert len(length_groups(tokens.argmax(-1) + 1)) > 1  # several groups are actually used
    with torch.no_grad():
        expected = model.text(tokens)
        assert (model.encode_text(tokens) - expected).abs().max() < TOL
        assert (model.encode_text(tokens[:1]) - expected[:1]).abs().max() < TOL
        assert (TextEncoder(model)(tokens) - F.normalize(expected, dim=-1)).abs().max() < TOL  # ONNX: no trimming
        assert model.encode_text(tokens[:0]).shape == (0, model.embed_dim)


def test_vit_fast_path_equals_plain():
    model = clip_pacl.load("tiny").eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model.visual(images)
        assert (model.encode_image(images) - expected).abs().max() < TOL
        assert (model.encode_image_tokens(images)[:, 0] - expected).abs().max() < TOL


@pytest.mark.parametrize("gelu", [False, True])
def test_dense_equals_linear(gelu):
    """Trick 5 (oneDNN's kernels where PyTorch has them): the same product, bias and exact GELU."""
    x, weight, bias = torch.randn(2, 50, 96), torch.randn(384, 96) * 96**-0.5, torch.randn(384)
    expected = F.linear(x, weight, bias)
    expected = F.gelu(expected) if gelu else expected
    with torch.inference_mode():
        assert (layers.dense(x, weight, bias, gelu) - expected).abs().max() < TOL
        assert (layers.dense(x[:, 0], weight[:8], None) - F.linear(x[:, 0], weight[:8])).abs().max() < TOL
        assert layers.dense(x[:0], weight, bias).shape == (0, 50, 384)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_vit_tokens_fast_path_equals_plain(quick_gelu, monkeypatch):
    """Every token (dense features, MaskCLIP) through trick 5's blocks; QuickGELU models keep their activation."""
    config = clip_pacl.CLIPConfig.from_name("tiny")
    model = clip_pacl.CLIP(dataclasses.replace(config, quick_gelu=quick_gelu)).eval()
    images = torch.randn(2, 3, 64, 64)
    calls = []
    dense = layers.dense
    monkeypatch.setattr(layers, "dense", lambda *a, **kw: calls.append(1) or dense(*a, **kw))
    with torch.no_grad():
        plain = {"tokens": model.visual.forward_tokens, "maskclip": model.visual.forward_maskclip}
        for mode, plain_tokens in plain.items():
            calls.clear()
            assert (model.encode_image_tokens(images, mode) - plain_tokens(images)).abs().max() < TOL
            assert len(calls) >= 4 * (model.config.vision.layers - 1)  # the blocks' linears went through trick 5
        assert (model.encode_image(images) - model.visual(images)).abs().max() < TOL


def record_fast_calls(monkeypatch, tower, name: str, calls: list) -> None:
    """Record `name` in `calls` each time `tower` runs with fast=True."""
    forward = tower.forward
    monkeypatch.setattr(tower, "forward", lambda x, fast=False: (fast and calls.append(name)) or forward(x, fast=fast))


def test_encoders_take_the_fast_path_only_without_autograd_in_eval_mode(monkeypatch):
    model = clip_pacl.load("tiny")
    calls = []
    record_fast_calls(monkeypatch, model.text, "text", calls)
    record_fast_calls(monkeypatch, model.visual, "image", calls)
    images, tokens = torch.randn(2, 3, 64, 64), tokens_with_lengths([5, 9])
    model.eval()
    model.encode_image(images), model.encode_text(tokens)  # autograd on
    with torch.no_grad():
        model(images, tokens)  # forward is always the plain definition
        model.train()
        model.encode_image(images), model.encode_text(tokens)  # training mode
    assert calls == []
    with torch.inference_mode():
        model.eval()
        model.encode_image(images), model.encode_text(tokens)
    assert calls == ["image", "text"]


@pytest.fixture
def resnet():
    model = clip_pacl.load("tiny-rn")
    for module in model.modules():  # fresh statistics are 0/1 and weights 1/0: make the folding matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    return model.eval()


def plain(model, images):
    """The towers as written (forward, BatchNorm modules)."""
    with torch.no_grad():
        return model.visual(images)


def test_resnet_fast_path_equals_plain(resnet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (resnet.encode_image(images) - plain(resnet, images)).abs().max() < TOL
        for dense, method in (("tokens", resnet.visual.forward_tokens), ("maskclip", resnet.visual.forward_maskclip)):
            assert (resnet.encode_image_tokens(images, dense) - method(images)).abs().max() < TOL
    folded = [resnet.visual.folded, *(block.folded for block in resnet.visual.modules() if hasattr(block, "folded"))]
    assert all(f.weights for f in folded)  # the folded path ran in the stem and every bottleneck


def test_resnet_tokens_are_the_attention_pool_at_every_position(resnet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = resnet.visual.forward_tokens(images)
        maskclip = resnet.visual.forward_maskclip(images)
    assert (tokens[:, 0] - plain(resnet, images)).abs().max() < TOL
    assert tokens.shape == maskclip.shape == (2, 1 + 2 * 2, resnet.embed_dim)
    assert (tokens - maskclip).abs().max() > 1e-3  # full attention is not the value path


def test_resnet_fold_cache_follows_weight_changes(resnet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = resnet.encode_image(images)
        resnet.visual.layer2[0].bn2.running_var.mul_(3.0)  # in place: same storage, new version
        after = resnet.encode_image(images)
    assert (after - before).abs().max() > 1e-3
    assert (after - plain(resnet, images)).abs().max() < TOL

    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    state["visual.conv1.weight"].mul_(0.5)
    resnet.load_state_dict(state)
    with torch.no_grad():
        assert (resnet.encode_image(images) - plain(resnet, images)).abs().max() < TOL


def test_resnet_fast_path_under_inference_mode(resnet):
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert (resnet.encode_image(images) - plain(resnet, images)).abs().max() < TOL
    with torch.no_grad():  # folded weights made under inference_mode serve outside it too
        assert (resnet.encode_image(images) - plain(resnet, images)).abs().max() < TOL
    with torch.inference_mode():  # weights that are inference tensors have no version: folded on every call
        made_inside = clip_pacl.load("tiny-rn").eval()
        made_inside.encode_image(images)
        made_inside.visual.bn1.running_var.mul_(4.0)
        assert (made_inside.encode_image(images) - made_inside.visual(images)).abs().max() < TOL


def test_every_parameter_gets_a_gradient():
    """DDP (without find_unused_parameters) requires it: training runs the plain towers, key biases included."""
    for preset in ("tiny", "tiny-rn"):
        model = clip_pacl.load(preset).train()
        out = model(torch.randn(2, 3, 64, 64), tokens_with_lengths([5, 9]))
        (out.image_features.sum() + out.text_features.sum()).backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None and name != "logit_scale"]
        assert not missing, f"{preset}: {missing}"


def test_resnet_training_uses_batch_statistics(resnet):
    images = torch.randn(4, 3, 64, 64)
    resnet.train()
    running_mean = resnet.visual.bn1.running_mean.clone()
    with torch.no_grad():
        resnet.encode_image(images)
    assert not torch.equal(resnet.visual.bn1.running_mean, running_mean)  # BatchNorm ran in training mode
