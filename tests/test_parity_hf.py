"""Hugging Face CLIPModel checkpoints load into clip_pacl with the same outputs, and our export loads in HF.

Both sides have every weight randomised (`helpers.randomize_`), so a swapped norm or bias cannot match by luck."""

import json

import pytest
import torch

import clip_pacl
from clip_pacl.checkpoint import export_hf, load_with_source
from clip_pacl.errors import CheckpointError
from helpers import hf_diff, randomize_, require

transformers = require("transformers")

TOL = 1e-5


def hf_config(hidden_act: str, **text_overrides):
    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=49408, hidden_act=hidden_act, **text_overrides)
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3, image_size=48,
                  patch_size=16, hidden_act=hidden_act)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def random_hf_model(hidden_act: str, **text_overrides):
    return randomize_(transformers.CLIPModel(hf_config(hidden_act, **text_overrides))).eval()


def assert_same_as_hf(hf_model, ours, image_size: int) -> None:
    """Raw and normalised image/text features and HF's logits agree within 1e-5."""
    assert hf_diff(hf_model, ours, image_size) < TOL


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_hf_directory_loads_with_same_outputs(tmp_path, hidden_act):
    hf_model = random_hf_model(hidden_act)
    hf_model.save_pretrained(tmp_path / "hf")
    model, source = load_with_source(tmp_path / "hf")
    assert source.format == "hf"
    assert model.config.quick_gelu == (hidden_act == "quick_gelu")
    assert model.config.vision.heads == 3 and model.config.text.heads == 4 and model.embed_dim == 32
    assert_same_as_hf(hf_model, model, 48)


def test_hf_pytorch_model_bin_with_position_ids(tmp_path):
    """Older HF checkpoints are pickles (read with weights_only=True) that also carry position_ids buffers."""
    hf_model = random_hf_model("quick_gelu")
    hf_model.config.save_pretrained(tmp_path)
    state = dict(hf_model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_as_hf(hf_model, clip_pacl.load(tmp_path), 48)
    assert_same_as_hf(hf_model, clip_pacl.load(tmp_path / "config.json"), 48)  # the config file names its dir


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_round_trip_through_hf_is_exact_and_hf_agrees(tmp_path, quick_gelu):
    ours = randomize_(clip_pacl.load("tiny", quick_gelu=quick_gelu))
    export_hf(ours, tmp_path / "hf")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf")
    assert_same_as_hf(hf_model, ours, 64)
    back = clip_pacl.load(tmp_path / "hf")
    assert back.config.vision == ours.config.vision and back.config.text == ours.config.text
    assert back.config.quick_gelu == quick_gelu
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_hf_settings_are_refused(tmp_path):
    for overrides, message in [({"layer_norm_eps": 1e-6}, "layer_norm_eps"), ({"eos_token_id": 500}, "eos_token_id")]:
        torch.manual_seed(0)
        transformers.CLIPModel(hf_config("quick_gelu", **overrides)).save_pretrained(tmp_path / message)
        with pytest.raises(CheckpointError, match=message):
            clip_pacl.load(tmp_path / message)
    data = json.loads((tmp_path / "eos_token_id" / "config.json").read_text())
    data["text_config"]["hidden_act"] = "relu"
    data["text_config"]["eos_token_id"] = 49407
    (tmp_path / "eos_token_id" / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="hidden_act"):
        clip_pacl.load(tmp_path / "eos_token_id")


def test_resnet_and_siglip_cannot_go_to_hf(tmp_path):
    with pytest.raises(CheckpointError, match="ResNet"):
        export_hf(clip_pacl.load("tiny-rn"), tmp_path / "rn")
    from dataclasses import replace

    siglip = clip_pacl.CLIP(replace(clip_pacl.CLIPConfig.from_name("tiny"), init_logit_bias=-10.0))
    with pytest.raises(CheckpointError, match="logit bias"):
        export_hf(siglip, tmp_path / "siglip")
