"""Losses: parity with open_clip's ClipLoss / SigLipLoss, the objective registry, basic behaviour."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip_pacl.errors import ConfigError
from clip_pacl.losses import clip_loss, get_objective, siglip_loss
from helpers import require


def _features(b: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)


def test_clip_loss_matches_open_clip():
    open_clip_loss = require("open_clip.loss")
    img, txt = _features()
    scale = torch.tensor(math.log(1 / 0.07))
    ref = open_clip_loss.ClipLoss()(img, txt, scale.exp())
    assert torch.allclose(clip_loss(img, txt, scale), ref, atol=1e-6)


def test_siglip_loss_matches_open_clip():
    open_clip_loss = require("open_clip.loss")
    img, txt = _features()
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    ref = open_clip_loss.SigLipLoss()(img, txt, scale.exp(), bias)
    assert torch.allclose(siglip_loss(img, txt, scale, bias), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_objective_prefers_matching_pairs(name):
    objective = get_objective(name)
    img, _ = _features()
    scale = torch.tensor(objective.init_logit_scale or math.log(1 / 0.07))
    bias = None if objective.init_logit_bias is None else torch.tensor(objective.init_logit_bias)
    aligned = objective.loss(img, img, scale, bias)
    shuffled = objective.loss(img, img.roll(1, 0), scale, bias)
    assert aligned < shuffled


def test_clip_loss_is_symmetric_in_the_two_sides():
    img, txt = _features()
    scale = torch.tensor(2.0)
    assert torch.allclose(clip_loss(img, txt, scale), clip_loss(txt, img, scale), atol=1e-6)


def test_gradients_reach_features_and_temperature():
    img, txt = _features()
    img.requires_grad_(True)
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    get_objective("clip").loss(img, txt, scale).backward()
    assert img.grad.abs().sum() > 0 and scale.grad.abs() > 0


def test_unknown_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        get_objective("nope")
