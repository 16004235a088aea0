"""The encoders' speed paths compute the same function as the plain computation they replace.

- ViT / text: the last block evaluates only the pooled row (class token, EOT), with attention from one query
  (`attend_one_query`); the text tower encodes groups of similar length separately.
- ResNet: in eval-mode inference BatchNorm is folded into the convolutions, cached until a weight changes.
"""

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
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
    b_k, b_v = torch.randn(d), torch.randn(d)
    key_mask = torch.arange(n) <= torch.tensor([0, 5, 10])[:, None]  # (B, N)
    k = F.linear(x, w_k, b_k).view(b, n, heads, -1).transpose(1, 2)
    v = F.linear(x, w_v, b_v).view(b, n, heads, -1).transpose(1, 2)
    for mask in (None, key_mask):
        sdpa_mask = None if mask is None else mask[:, None, None, :]
        expected = F.scaled_dot_product_attention(q.view(b, heads, 1, -1), k, v, attn_mask=sdpa_mask).reshape(b, d)
        assert (attend_one_query(q, x, w_k, b_k, w_v, b_v, heads, mask) - expected).abs().max() < TOL


def test_length_groups_partition_the_batch():
    lengths = torch.tensor([5] * 32 + [70] * 32)[torch.randperm(64)]
    groups = length_groups(lengths)
    assert len(groups) == 2
    assert sorted(torch.cat(groups).tolist()) == list(range(64))
    assert [set(lengths[g].tolist()) for g in groups] == [{5}, {70}]
    assert len(length_groups(torch.full((50,), 12))) == 1
    assert len(length_groups(torch.tensor([3, 4]))) == 1  # not worth a second call
    assert len(length_groups(torch.tensor([], dtype=torch.long))) == 1


def test_text_pooled_path_equals_full_computation():
    model = clip_pacl.load("tiny").eval()
    tokens = tokens_with_lengths([3, 4, 6, 9, 12, 20, 33, 50, 77] * 4)
    assert len(length_groups(tokens.argmax(-1) + 1)) > 1  # several groups are actually used
    with torch.no_grad():
        expected = full_text_reference(model.text, tokens)
        assert (model.encode_text(tokens) - expected).abs().max() < TOL
        assert (model.encode_text(tokens[:1]) - expected[:1]).abs().max() < TOL
    assert model.encode_text(tokens[:0]).shape == (0, model.embed_dim)


def test_text_pooled_path_has_the_same_gradients():
    model = clip_pacl.load("tiny").train()
    tokens = tokens_with_lengths([3, 9, 40, 77] * 2)
    model.encode_text(tokens).square().sum().backward()
    fast = {n: p.grad.clone() for n, p in model.text.named_parameters()}
    model.zero_grad()
    full_text_reference(model.text, tokens).square().sum().backward()
    for name, param in model.text.named_parameters():
        assert (fast[name] - param.grad).abs().max() <= 1e-5 * param.grad.abs().max(), name


def test_vit_pooled_path_equals_full_computation():
    model = clip_pacl.load("tiny").eval()
    visual = model.visual
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = visual.ln_post(visual.transformer(visual.embed(images))[:, 0]) @ visual.proj
        assert (model.encode_image(images) - expected).abs().max() < TOL
        assert (model.encode_image_tokens(images)[:, 0] - expected).abs().max() < TOL


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


def unfolded(model, images):
    """The BatchNorm modules as written (eval mode, autograd on: the folded path is not taken)."""
    with torch.enable_grad():
        return model.encode_image(images).detach()


def test_resnet_folded_batchnorm_equals_batchnorm(resnet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        folded = resnet.encode_image(images)
        folded_tokens = resnet.encode_image_tokens(images)
    assert resnet.visual._folded is not None  # the folded path ran
    assert (folded - unfolded(resnet, images)).abs().max() < TOL
    with torch.enable_grad():
        tokens = resnet.encode_image_tokens(images).detach()
    assert (folded_tokens - tokens).abs().max() < TOL


def test_resnet_fold_cache_follows_weight_changes(resnet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = resnet.encode_image(images)
        resnet.visual.layer2[0].bn2.running_var.mul_(3.0)  # in place: same storage, new version
        after = resnet.encode_image(images)
    assert (after - before).abs().max() > 1e-3
    assert (after - unfolded(resnet, images)).abs().max() < TOL

    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    state["visual.conv1.weight"].mul_(0.5)
    resnet.load_state_dict(state)
    with torch.no_grad():
        assert (resnet.encode_image(images) - unfolded(resnet, images)).abs().max() < TOL


def test_every_parameter_gets_a_gradient():
    """DDP (without find_unused_parameters) requires it; the one-query attention keeps the key biases in."""
    for preset in ("tiny", "tiny-rn"):
        model = clip_pacl.load(preset).train()
        out = model(torch.randn(2, 3, 64, 64), tokens_with_lengths([5, 9]))
        (out.image_features.sum() + out.text_features.sum()).backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None and name != "logit_scale"]
        assert not missing, f"{preset}: {missing}"


def test_resnet_training_uses_batch_statistics(resnet):
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        resnet.encode_image(images)
    resnet.train()
    assert resnet.visual._folded is None  # train() drops the cache
    running_mean = resnet.visual.bn1.running_mean.clone()
    features = resnet.encode_image(images)
    assert features.requires_grad
    assert not torch.equal(resnet.visual.bn1.running_mean, running_mean)  # BatchNorm ran in training mode
