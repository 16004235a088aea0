import pytest
import torch

import clip_pacl
from clip_pacl.config import CLIPConfig


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_forward_shapes_and_normalisation(preset):
    model = clip_pacl.load(preset).eval()
    cfg = model.config
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    texts = torch.randint(1, 1000, (3, cfg.text.context_length))
    texts[:, 7] = cfg.text.vocab_size - 1
    out = model(images, texts)
    assert out.image_features.shape == (3, cfg.embed_dim)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out.logit_scale, torch.tensor(1 / 0.07), rtol=1e-5)
    tokens = model.encode_image_tokens(images)
    assert tokens.shape == (3, 1 + cfg.vision.grid_size**2, cfg.embed_dim)
    assert torch.allclose(tokens[:, 0], model.encode_image(images), atol=1e-5)


def test_text_truncation_at_longest_eot_is_exact():
    model = clip_pacl.load("tiny").eval()
    texts = torch.randint(1, 1000, (2, 77))
    texts[0, 5] = 49407
    texts[1, 9] = 49407
    texts[:, 10:] = 0
    truncated = model.encode_text(texts)
    # Reference: run the full 77 positions with an explicit causal mask, pool at EOT.
    t = model.text
    x = t.token_embedding(texts) + t.positional_embedding
    mask = torch.full((77, 77), float("-inf")).triu(1)
    for block in t.transformer.resblocks:
        x = x + block.attn(block.ln_1(x), attn_mask=mask)
        x = x + block.mlp(block.ln_2(x))
    full = t.ln_final(x[torch.arange(2), texts.argmax(-1)]) @ t.text_projection
    assert (truncated - full).abs().max() < 1e-5


def test_presets_parse():
    for name in ["RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "tiny", "tiny-rn"]:
        cfg = CLIPConfig.from_name(name)
        assert CLIPConfig.from_open_clip_dict(cfg.to_open_clip_dict()).vision == cfg.vision
    assert CLIPConfig.from_name("ViT-B-32-quickgelu").quick_gelu
