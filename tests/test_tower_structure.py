"""Towers expose their structure (`layer_groups`) to LiT locking and PACL alike, resize positional embeddings one
way, and keep their inference-path state (folded BatchNorm) to themselves."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip_pacl
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.train import optim

TOL = 1e-5


def parameters_of(group):
    return [p for item in group for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())]


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_layer_groups_partition_each_tower(preset):
    model = clip_pacl.load(preset)
    for tower in (model.visual, model.text):
        ids = [id(p) for group in tower.layer_groups() for p in parameters_of(group)]
        assert len(ids) == len(set(ids)), f"{type(tower).__name__}: a parameter in two groups"
        assert set(ids) == {id(p) for p in tower.parameters()}, f"{type(tower).__name__}: a parameter in no group"


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
@pytest.mark.parametrize("n", [1, 2])
def test_pacl_unfreezes_the_groups_lit_unlocks(preset, n):
    """`unfreeze_last_n_blocks=n` and `--lock-image-unlocked-groups n` train the same image-tower weights: the last
    n blocks (ViT) or stages (ResNet), the last with the head."""
    lit = clip_pacl.load(preset)
    optim.lock_image_tower(lit, unlocked_groups=n)
    pacl = PACL(clip_pacl.load(preset), PACLConfig(unfreeze_last_n_blocks=n))
    trained = {name for name, p in lit.visual.named_parameters() if p.requires_grad}
    assert trained == {name for name, p in pacl.clip.visual.named_parameters() if p.requires_grad}
    head = "attnpool.c_proj.weight" if preset == "tiny-rn" else "proj"
    assert head in trained and "conv1.weight" not in trained


def test_resnet_attention_pool_resizes_positions_for_any_other_grid():
    """A grid with the trained number of positions but another shape (1 x 4 against 2 x 2) is resized too."""
    pool = clip_pacl.load("tiny-rn").visual.attnpool
    x = torch.randn(1, pool.k_proj.in_features, 1, 4)
    pos = pool.positional_embedding.detach()
    grid = pos[1:].reshape(1, pool.spatial_dim, pool.spatial_dim, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(1, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(4, -1)
    flat = x.flatten(2).transpose(1, 2)
    expected = torch.cat([flat.mean(1, keepdim=True), flat], 1) + torch.cat([pos[:1], grid])
    with torch.no_grad():
        assert (pool.tokens(x) - expected).abs().max() < TOL


def test_folded_batchnorm_belongs_to_each_copy():
    model = clip_pacl.load("tiny-rn").eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # fresh weights are 1/0 (bn3: 0): make every one matter
            module.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(module.weight, 1.0, 0.2)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.encode_image(images)  # folds
        twin = copy.deepcopy(model)
        assert not twin.visual.folded.weights and not twin.visual.layer1[0].folded.weights  # a copy starts empty
        twin.visual.layer1[0].bn1.running_var.mul_(3.0)
        assert (twin.encode_image(images) - twin.visual(images)).abs().max() < TOL
        assert (model.encode_image(images) - model.visual(images)).abs().max() < TOL
        assert (twin.encode_image(images) - model.encode_image(images)).abs().max() > 1e-4
    assert not any("folded" in key for key in model.state_dict())
