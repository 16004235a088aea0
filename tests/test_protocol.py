"""Every contrastive model offers the same interface (models/protocol.py), with its own preprocessing."""

import torch

import clip_pacl
from clip_pacl.models.pacl import PACL
from clip_pacl.models.protocol import ContrastiveModel, PatchScorer
from clip_pacl.preprocess import model_tokenizer, model_transform


def test_clip_and_pacl_are_contrastive_models():
    clip = clip_pacl.load("tiny-rn")
    pacl = PACL(clip_pacl.load("tiny"))
    for model in (clip, pacl):
        assert isinstance(model, ContrastiveModel)
        assert model_tokenizer(model)(["a cat"]).shape == (1, model.context_length)
        assert model_transform(model, image_size=48).image_size == 48
    assert isinstance(pacl, PatchScorer) and not isinstance(clip, PatchScorer)
    assert (clip.model_type, pacl.model_type) == ("clip", "pacl")
    assert clip.patch_stride == 32 and pacl.patch_stride == pacl.clip.config.vision.patch_size
    assert clip.patch_grid(64, 96) == (2, 3)


def test_pacl_cached_features_have_their_own_entry_point():
    pacl = PACL(clip_pacl.load("tiny")).eval()
    images, tokens = torch.randn(2, 3, 64, 64), clip_pacl.tokenize(["a red circle", "two squares"])
    with torch.no_grad():
        direct = pacl.loss_features(images, tokens)
        cached = pacl.loss_features_from_cache(pacl.clip_patch_tokens(images), pacl.clip_text_embeddings(tokens))
    for a, b in zip(direct, cached):
        torch.testing.assert_close(a, b)
