"""PACL: the exact all-pairs compatibility and loss against a naive per-pair loop, and the model's contract."""

import json

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.checkpoint.pacl import load_pacl
from clip_pacl.losses import get_objective
from clip_pacl.losses.pacl import pacl_logits, pacl_loss
from clip_pacl.models.pacl import PACL, PACLConfig, compatibility
from helpers import randomize_


def naive_logits(patch_emb, text_emb, logit_scale):
    """The paper's definition, one (image, text) pair at a time: pool the patches, then take the cosine."""
    rows = []
    for v in patch_emb:  # (N, D)
        row = []
        for t in text_emb:  # (D,)
            a = (v @ t).softmax(dim=0)  # (N,)
            p = (a[:, None] * v).sum(dim=0)  # (D,)
            row.append(F.cosine_similarity(p, t, dim=0))
        rows.append(torch.stack(row))
    return logit_scale * torch.stack(rows)  # the scale itself, as the losses take it


def naive_loss(patch_emb, text_emb, logit_scale):
    logits = naive_logits(patch_emb, text_emb, logit_scale)
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _features(b=5, n=7, d=16, dtype=torch.float32):
    patches = F.normalize(torch.randn(b, n, d, dtype=dtype), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(b, d, dtype=dtype), dim=-1).requires_grad_()
    scale = torch.tensor(7.0, dtype=dtype, requires_grad=True)  # the scale (not its log)
    return patches, texts, scale


@pytest.mark.parametrize("chunk_size", [256, 2])  # one block, and several checkpointed text chunks
def test_loss_and_gradients_match_naive_loop(chunk_size):
    # Raw (unnormalised) embedder outputs are the leaves and both sides normalise them, as the model does:
    # the gradients then include the normalisation, which the exact formula relies on (|t| = 1).
    raw = [torch.randn(5, 7, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True),
           torch.tensor(2.0, requires_grad=True)]
    # raw[2] is the log-space parameter: the losses take its exp, as models give it
    loss = pacl_loss(F.normalize(raw[0], dim=-1), F.normalize(raw[1], dim=-1), raw[2].exp(), chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, raw)
    ref_raw = [x.detach().double().requires_grad_() for x in raw]
    ref = naive_loss(F.normalize(ref_raw[0], dim=-1), F.normalize(ref_raw[1], dim=-1), ref_raw[2].exp())
    ref_grads = torch.autograd.grad(ref, ref_raw)
    assert abs(loss.item() - ref.item()) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() < 1e-5
    patches, texts, scale = _features()
    logits = pacl_logits(patches, texts, scale, chunk_size=chunk_size)
    assert (logits.double() - naive_logits(patches.double(), texts.double(), scale.double())).abs().max() < 1e-5


def test_compatibility_is_rectangular_and_bias_is_added():
    patches, _, scale = _features(b=3)
    texts = F.normalize(torch.randn(4, 16), dim=-1)
    phi = compatibility(patches, texts, chunk_size=3)  # 3 images x 4 texts, texts in two chunks
    assert phi.shape == (3, 4)
    reference = naive_logits(patches.double(), texts.double(), torch.tensor(1.0, dtype=torch.float64))
    assert (phi.double() - reference).abs().max() < 1e-6
    bias = torch.tensor(-1.5)
    assert torch.allclose(pacl_logits(patches, texts, scale, bias), pacl_logits(patches, texts, scale) + bias)


def test_registered_objective_is_the_pacl_loss():
    patches, texts, scale = _features()
    assert torch.allclose(get_objective("pacl").loss(patches, texts, scale), pacl_loss(patches, texts, scale))


def _tokens(n, context_length=77):
    from clip_pacl.tokenizer import tokenize

    return tokenize([f"a photo of a {w}" for w in ["red circle", "blue square", "green star", "dog"][:n]],
                    context_length=context_length)


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_only_embedders_train_and_frozen_parts_stay_in_eval_mode(preset):
    model = PACL(clip_pacl.load(preset)).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in ("vision_embedder", "text_embedder", "logit_scale") for n in trainable)
    assert not model.clip.training and model.vision_embedder.training
    assert model.vision_frozen
    assert torch.allclose(model.logit_scale.exp(), torch.tensor(1 / 0.07), rtol=1e-5)
    assert model.logit_bias is None

    images = torch.randn(2, 3, 64, 64)
    patches, texts = model.loss_features(images, _tokens(2))
    grid = model.grid_size
    assert patches.shape == (2, grid * grid, model.embed_dim) and texts.shape == (2, model.embed_dim)
    norm = torch.full((2, grid * grid), 1 / model.config.pool_temperature)  # the temperature rides on the patches
    assert torch.allclose(patches.norm(dim=-1), norm, rtol=1e-5)
    pacl_loss(patches, texts, model.logit_scale.exp()).backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.vision_embedder.mlp[0].weight.grad is not None


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_unfreezing_last_blocks(preset):
    model = PACL(clip_pacl.load(preset), PACLConfig(unfreeze_last_n_blocks=1)).train()
    visual = model.clip.visual
    last = visual.transformer.resblocks[-1] if preset == "tiny" else visual.layer4
    first = visual.transformer.resblocks[0] if preset == "tiny" else visual.layer1
    assert all(p.requires_grad for p in last.parameters()) and last.training
    assert not any(p.requires_grad for p in first.parameters()) and not first.training
    assert not any(p.requires_grad for p in model.clip.text.parameters())
    assert not model.vision_frozen
    # the unfrozen modules are not registered twice
    assert not any(k.startswith("_unfrozen") for k in model.state_dict())
    patches, texts = model.loss_features(torch.randn(2, 3, 64, 64), _tokens(2))
    pacl_loss(patches, texts, model.logit_scale.exp()).backward()
    assert next(iter(last.parameters())).grad is not None


def test_precomputed_clip_features_give_the_same_loss_features():
    model = PACL(clip_pacl.load("tiny")).eval()
    images, tokens = torch.randn(3, 3, 64, 64), _tokens(3)
    from_inputs = model.loss_features(images, tokens)
    cached = model.loss_features_from_cache(model.clip_patch_tokens(images), model.clip_text_embeddings(tokens))
    for a, b in zip(from_inputs, cached):
        assert torch.allclose(a, b, atol=1e-6)


def test_similarity_and_patch_similarity_are_phi_and_s():
    model = PACL(clip_pacl.load("tiny")).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        classes = model.encode_text(_tokens(4), normalize=True)
        patches = model.patch_embeddings(images)
        sim = model.similarity(images, classes)
        pooled = patches.double() / model.config.pool_temperature
        ref = naive_logits(pooled, classes.double(), torch.tensor(1.0, dtype=torch.float64))
        per_patch = model.patch_similarity(images, classes)
    assert sim.shape == (2, 4) and (sim.double() - ref).abs().max() < 1e-5
    assert per_patch.shape == (2, 4, 8, 8)
    assert torch.allclose(per_patch.flatten(2).transpose(1, 2), patches @ classes.T, atol=1e-5)
    image_features = model.encode_image(images, normalize=True)
    assert torch.allclose(image_features, F.normalize(patches.mean(dim=1), dim=-1), atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=64, unfreeze_last_n_blocks=1)).eval()
    randomize_(model)  # embedders, logit scale and every CLIP weight (fine-tuned or frozen) differ from a fresh one
    clip_pacl.save(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "pacl" and config["pacl"]["hidden_dim"] == 64
    assert (tmp_path / "ckpt" / "pacl.safetensors").is_file() and (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = load_pacl(tmp_path / "ckpt").eval()
    images, tokens = torch.randn(2, 3, 64, 64), _tokens(2)
    with torch.no_grad():
        for a, b in zip(model.loss_features(images, tokens), loaded.loss_features(images, tokens)):
            assert torch.equal(a, b)
    assert loaded.config == model.config
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)


def test_loading_a_broken_checkpoint_is_one_clear_error(tmp_path):
    from clip_pacl.errors import CheckpointError

    clip_pacl.save(PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32)), tmp_path)
    (tmp_path / "pacl.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no pacl.safetensors"):
        load_pacl(tmp_path)


def test_training_the_embedders_learns_to_match_cached_features():
    """A few optimiser steps on a fixed batch of cached CLIP features must lower the PACL loss a lot."""
    clip = clip_pacl.load("tiny").eval()
    model = PACL(clip, PACLConfig(hidden_dim=64)).train()
    patch_tokens = torch.randn(8, 16, clip.embed_dim)  # (B, N, D_clip): a 4x4 grid of CLIP patch tokens
    text_emb = torch.randn(8, clip.embed_dim)  # unrelated "captions": only the embedders can match them
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = pacl_loss(*model.loss_features_from_cache(patch_tokens, text_emb), model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_pool_temperature_sharpens_the_pooling_and_keeps_phi_a_cosine():
    clip = clip_pacl.load("tiny").eval()
    sharp = PACL(clip, PACLConfig(pool_temperature=0.1)).eval()
    images, tokens = torch.randn(2, 3, 64, 64), _tokens(3)
    with torch.no_grad():
        pooled, texts = sharp.loss_features(images, tokens)
        patches = sharp.patch_embeddings(images)
        assert torch.allclose(pooled, patches / 0.1)  # the temperature rides on the features
        expected = []
        for v in patches:  # phi with a = softmax(s / 0.1)
            a = (v @ texts.T / 0.1).softmax(dim=0)  # (N, 3)
            expected.append(F.cosine_similarity(a.T @ v, texts, dim=-1))
        assert torch.allclose(sharp.similarity(images, texts), torch.stack(expected), atol=1e-5)
    with pytest.raises(clip_pacl.errors.ConfigError, match="pool_temperature"):
        PACLConfig(pool_temperature=0)


def test_patch_tokens_can_come_from_the_maskclip_value_path():
    clip = clip_pacl.load("tiny").eval()
    model = PACL(clip, PACLConfig(patch_tokens="maskclip")).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = clip.encode_image_tokens(images, dense="maskclip")[:, 1:]
        assert torch.allclose(model.clip_patch_tokens(images), expected)
    with pytest.raises(clip_pacl.errors.ConfigError, match="patch_tokens"):
        PACLConfig(patch_tokens="cls")
