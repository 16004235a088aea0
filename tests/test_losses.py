"""Losses: parity with open_clip's ClipLoss / SigLipLoss, the objective registry, basic behaviour."""

import math

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.errors import ConfigError
from clip_pacl.losses import clip_loss, get_objective, siglip_loss
from helpers import require


def _features(b: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)


def test_clip_loss_matches_open_clip():
    open_clip_loss = require("open_clip.loss")
    img, txt = _features()
    scale = torch.tensor(1 / 0.07)  # the scale itself, as open_clip's ClipLoss takes it
    ref = open_clip_loss.ClipLoss()(img, txt, scale)
    assert torch.allclose(clip_loss(img, txt, scale), ref, atol=1e-6)
    assert torch.allclose(get_objective("clip").loss(img, txt, scale), ref, atol=1e-6)


def test_siglip_loss_matches_open_clip():
    open_clip_loss = require("open_clip.loss")
    img, txt = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ref = open_clip_loss.SigLipLoss()(img, txt, scale, bias)
    assert torch.allclose(siglip_loss(img, txt, scale, bias), ref, atol=1e-5)
    assert torch.allclose(get_objective("siglip").loss(img, txt, scale, bias), ref, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_batch():
    torch.manual_seed(0)
    model = clip_pacl.load("tiny")
    images = torch.randn(8, 3, model.image_size, model.image_size)
    texts = model.get_tokenizer()([f"a photo of thing number {i}" for i in range(8)])
    return model, images, texts


def test_the_loss_of_the_models_output_is_clips_loss(tiny_batch):
    """`clip_loss(*model(images, texts))`: the forward's outputs are the loss's inputs, scale included. An untrained
    model scores every pair alike, so the loss is about ln B (it used to exponentiate the scale twice: ~40,000)."""
    model, images, texts = tiny_batch
    with torch.no_grad():
        out = model(images, texts)
        loss = clip_loss(*out)
    assert torch.allclose(out.logit_scale, model.logit_scale.exp()) and out.logit_scale.item() == pytest.approx(
        1 / 0.07, rel=1e-5)
    assert abs(loss.item() - math.log(8)) < 0.3
    open_clip_loss = require("open_clip.loss")
    assert torch.allclose(loss, open_clip_loss.ClipLoss()(*out[:3]), atol=1e-6)  # open_clip reads it the same way


def test_the_siglip_loss_of_the_models_output_is_open_clips(tiny_batch):
    model, images, texts = tiny_batch
    siglip = clip_pacl.load("tiny")
    siglip.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(10.0))
        siglip.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
        out = siglip(images, texts)
        loss = siglip_loss(*out)
    open_clip_loss = require("open_clip.loss")
    assert torch.allclose(loss, open_clip_loss.SigLipLoss()(*out), atol=1e-5)
    # an untrained model: each image's positive pair costs about -log sigmoid(10 cos - 10), its negatives little
    assert 3.0 < loss.item() < 12.0


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_objective_prefers_matching_pairs(name):
    objective = get_objective(name)
    img, _ = _features()
    scale = torch.tensor(objective.init_logit_scale or math.log(1 / 0.07)).exp()
    bias = None if objective.init_logit_bias is None else torch.tensor(objective.init_logit_bias)
    aligned = objective.loss(img, img, scale, bias)
    shuffled = objective.loss(img, img.roll(1, 0), scale, bias)
    assert aligned < shuffled


def test_clip_loss_is_symmetric_in_the_two_sides():
    img, txt = _features()
    scale = torch.tensor(7.0)
    assert torch.allclose(clip_loss(img, txt, scale), clip_loss(txt, img, scale), atol=1e-6)


def test_gradients_reach_features_and_temperature():
    img, txt = _features()
    img.requires_grad_(True)
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)  # the log-space parameter
    get_objective("clip").loss(img, txt, scale.exp()).backward()
    assert img.grad.abs().sum() > 0 and scale.grad.abs() > 0


def test_unknown_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        get_objective("nope")
