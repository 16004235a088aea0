"""Hugging Face CLIPModel checkpoints load into clip_pacl with the same outputs, and our export loads in HF."""

import json

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.checkpoint import export_hf, load_with_source
from clip_pacl.errors import CheckpointError
from clip_pacl.tokenizer import tokenize

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a photo of a cat", "a diagram of two dogs playing in the long grass near a river at sunset"]
TOL = 1e-5


def hf_config(hidden_act: str, **text_overrides):
    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=49408, hidden_act=hidden_act, **text_overrides)
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3, image_size=48,
                  patch_size=16, hidden_act=hidden_act)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is projected; 4.x returns the tensor.
    return output.pooler_output if hasattr(output, "pooler_output") else output


def assert_same_as_hf(hf_model, ours, image_size: int) -> None:
    texts = tokenize(CAPTIONS)
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    hf_model.eval()
    ours.eval()
    with torch.no_grad():
        ref_image = _features(hf_model.get_image_features(pixel_values=images))
        ref_text = _features(hf_model.get_text_features(input_ids=texts))
        ref_logits = hf_model(input_ids=texts, pixel_values=images).logits_per_image
        image, text = ours.encode_image(images), ours.encode_text(texts)
        logits = ours.logits(images, texts)[0]
    assert (image - ref_image).abs().max() < TOL
    assert (text - ref_text).abs().max() < TOL
    assert (F.normalize(image, dim=-1) - F.normalize(ref_image, dim=-1)).abs().max() < TOL
    assert (logits - ref_logits).abs().max() < TOL


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_hf_directory_loads_with_same_outputs(tmp_path, hidden_act):
    torch.manual_seed(0)
    hf_model = transformers.CLIPModel(hf_config(hidden_act))
    hf_model.save_pretrained(tmp_path / "hf")
    model, source = load_with_source(tmp_path / "hf")
    assert source.format == "hf"
    assert model.config.quick_gelu == (hidden_act == "quick_gelu")
    assert model.config.vision.heads == 3 and model.config.text.heads == 4 and model.embed_dim == 32
    assert_same_as_hf(hf_model, model, 48)


def test_hf_pytorch_model_bin_with_position_ids(tmp_path):
    """Older HF checkpoints are pickles (read with weights_only=True) that also carry position_ids buffers."""
    torch.manual_seed(0)
    hf_model = transformers.CLIPModel(hf_config("quick_gelu"))
    hf_model.config.save_pretrained(tmp_path)
    state = dict(hf_model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_as_hf(hf_model, clip_pacl.load(tmp_path), 48)
    assert_same_as_hf(hf_model, clip_pacl.load(tmp_path / "config.json"), 48)  # the config file names its dir


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_round_trip_through_hf_is_exact_and_hf_agrees(tmp_path, quick_gelu):
    ours = clip_pacl.load("tiny", quick_gelu=quick_gelu)
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
