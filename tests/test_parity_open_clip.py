"""Weights saved by open_clip (and OpenAI's formats) load into clip_pacl and compute the same numbers.

Models are randomly initialised open_clip models (no downloads), saved to disk the way open_clip and
OpenAI save them, then read back by `clip_pacl.load` with the architecture inferred from the shapes.
"""

import json
import warnings
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clip_pacl
from clip_pacl.checkpoint import export_open_clip, load_with_source
from clip_pacl.tokenizer import tokenize

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a photo of a cat", "a diagram of two dogs playing in the long grass near a river at sunset"]
TOL = 1e-5


def _open_clip_model(name: str, tmp_path_factory, **kwargs):
    if name in ("tiny", "tiny-rn"):
        name = _register_tiny(name, tmp_path_factory)
    torch.manual_seed(0)
    model = open_clip.create_model(name, **kwargs).eval()
    for module in model.modules():  # fresh BatchNorm stats are 0/1: make them matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model


def _register_tiny(preset: str, tmp_path_factory) -> str:
    """Our tiny preset as an open_clip model config, registered the way users add their own configs."""
    cfg_dir = tmp_path_factory.mktemp("oc_configs")
    cfg = json.loads(resources.files("clip_pacl.presets").joinpath(f"{preset}.json").read_text())
    (cfg_dir / f"{preset}-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir / f"{preset}-test.json")
    return f"{preset}-test"


@pytest.fixture(scope="module")
def vit_b32_quickgelu(tmp_path_factory):
    return _open_clip_model("ViT-B-32-quickgelu", tmp_path_factory)


@pytest.fixture(scope="module")
def rn50_quickgelu(tmp_path_factory):
    return _open_clip_model("RN50-quickgelu", tmp_path_factory)


@pytest.fixture(scope="module")
def vit_b32_gelu(tmp_path_factory):
    return _open_clip_model("ViT-B-32", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_quickgelu(tmp_path_factory):
    return _open_clip_model("tiny", tmp_path_factory, force_quick_gelu=True)


@pytest.fixture(scope="module")
def texts():
    return tokenize(CAPTIONS)


def assert_same_outputs(reference, ours, image_size: int, texts: torch.Tensor) -> None:
    """Raw and normalised image/text features and logits agree with open_clip's within 1e-5.

    Both CLIPs' forward() only normalises encode_image/encode_text and scales the dot products, so one
    encoder pass per model gives all three (the big towers are slow on a shared CPU).
    """
    ours = ours.eval()
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(texts)
        image, text = ours.encode_image(images), ours.encode_text(texts)
    assert (image - ref_image).abs().max() < TOL
    assert (text - ref_text).abs().max() < TOL
    for a, b in ((image, ref_image), (text, ref_text)):
        assert (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).abs().max() < TOL
    logits = ours.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    ref_logits = reference.logit_scale.exp() * F.normalize(ref_image, dim=-1) @ F.normalize(ref_text, dim=-1).T
    assert (logits - ref_logits).abs().max() < TOL


def _save(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def test_vit_b32_quickgelu_state_dict(vit_b32_quickgelu, texts, tmp_path):
    path = tmp_path / "vit_b32.pt"
    _save(vit_b32_quickgelu.state_dict(), path)
    model, source = load_with_source(path)
    assert source.format == "open_clip"
    assert model.config.quick_gelu and model.config.vision.patch_size == 32 and model.config.vision.layers == 12
    assert model.config.vision.heads == 12 and model.config.text.heads == 8 and model.embed_dim == 512
    assert_same_outputs(vit_b32_quickgelu, model, 224, texts)


def test_training_checkpoint_with_ddp_prefix(tiny_quickgelu, texts, tmp_path):
    """open_clip's training checkpoints wrap the weights: {"epoch", "state_dict": {"module.visual...": ...}}."""
    state = {f"module.{k}": v for k, v in tiny_quickgelu.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.bin")
    assert_same_outputs(tiny_quickgelu, clip_pacl.load(tmp_path / "epoch_3.bin"), 64, texts)


def test_rn50_quickgelu_state_dict(rn50_quickgelu, texts, tmp_path):
    path = tmp_path / "rn50.safetensors"
    _save(rn50_quickgelu.state_dict(), path)
    model = clip_pacl.load(path)
    assert model.config.vision.layers == (3, 4, 6, 3) and model.config.vision.width == 64
    assert model.embed_dim == 1024 and model.image_size == 224
    assert_same_outputs(rn50_quickgelu, model, 224, texts)


def test_vit_b32_gelu_needs_the_override(vit_b32_gelu, texts, tmp_path):
    path = tmp_path / "vit_b32_gelu.safetensors"
    _save(vit_b32_gelu.state_dict(), path)
    model = clip_pacl.load(path, quick_gelu=False)
    assert not model.config.quick_gelu
    assert_same_outputs(vit_b32_gelu, model, 224, texts)
    # Without the override a bare state dict means QuickGELU (OpenAI's convention): different numbers.
    default = clip_pacl.load(path).eval()
    assert default.config.quick_gelu
    with torch.no_grad():
        assert (default.encode_text(texts) - vit_b32_gelu.encode_text(texts)).abs().max() > 1e-3


def test_tiny_state_dict_takes_heads_from_the_matching_preset(tiny_quickgelu, texts, tmp_path):
    # tiny uses 32-wide heads, which the weights cannot show; the shapes match the preset, which says so.
    torch.save(tiny_quickgelu.state_dict(), tmp_path / "tiny.pt")
    model = clip_pacl.load(tmp_path / "tiny.pt")
    assert model.config.vision.heads == 4 and model.config.text.heads == 4
    assert_same_outputs(tiny_quickgelu, model, 64, texts)


def test_sidecar_open_clip_config_and_explicit_config(tiny_quickgelu, texts, tmp_path):
    torch.save(tiny_quickgelu.state_dict(), tmp_path / "weights.pt")
    cfg = json.loads(resources.files("clip_pacl.presets").joinpath("tiny.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**cfg, "quick_gelu": True}}))
    assert_same_outputs(tiny_quickgelu, clip_pacl.load(tmp_path / "weights.pt"), 64, texts)
    explicit = clip_pacl.load(tmp_path / "weights.pt", config="tiny-quickgelu")
    assert_same_outputs(tiny_quickgelu, explicit, 64, texts)


def test_open_clip_hub_layout_directory(tiny_quickgelu, texts, tmp_path):
    export_dir = tmp_path / "repo"
    export_open_clip(clip_pacl.load(_saved(tiny_quickgelu, tmp_path)), export_dir)
    model, source = load_with_source(export_dir)
    assert source.format == "open_clip" and source.location.endswith("open_clip_model.safetensors")
    assert_same_outputs(tiny_quickgelu, model, 64, texts)


def _saved(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "src.pt")
    return tmp_path / "src.pt"


def _openai_torchscript(model, path, image_size: int, texts):
    """An archive in the layout of OpenAI's released `.pt` files: a traced CLIP whose state dict has the
    open_clip names plus `input_resolution`, `context_length`, `vocab_size` and the `attn_mask` buffer."""
    for key, value in {"input_resolution": image_size, "context_length": 77, "vocab_size": 49408}.items():
        model.__dict__.pop(key, None)  # open_clip keeps these as Python attributes; OpenAI's are tensors
        model.register_buffer(key, torch.tensor(value))
    images = torch.randn(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (images, texts), check_trace=False).save(str(path))


def test_openai_torchscript_archive(texts, tmp_path, tmp_path_factory):
    reference = _open_clip_model("tiny", tmp_path_factory, force_quick_gelu=True)
    _openai_torchscript(reference, tmp_path / "tiny-openai.pt", 64, texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; OpenAI's files are TorchScript
        state = torch.jit.load(str(tmp_path / "tiny-openai.pt")).state_dict()
    assert {"input_resolution", "context_length", "vocab_size", "attn_mask"} <= set(state)
    model, source = load_with_source(tmp_path / "tiny-openai.pt")
    assert source.format == "openai_torchscript"
    assert_same_outputs(reference, model, 64, texts)


def test_openai_plain_state_dict_rn(texts, tmp_path, tmp_path_factory):
    reference = _open_clip_model("tiny-rn", tmp_path_factory, force_quick_gelu=True)
    state = {**reference.state_dict(), "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "RN.pt")
    model, source = load_with_source(tmp_path / "RN.pt")
    assert source.format == "openai"
    assert next(model.parameters()).dtype == torch.float32
    reference.half().float()  # the same fp16 rounding the file went through
    assert_same_outputs(reference, model, 64, texts)


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_round_trip_through_open_clip_is_exact(preset, tmp_path):
    ours = clip_pacl.load(preset)
    for out in (tmp_path / "oc.pt", tmp_path / "oc.safetensors"):
        export_open_clip(ours, out)
        back = clip_pacl.load(out)
        assert back.config.vision == ours.config.vision and back.config.text == ours.config.text
        assert back.config.quick_gelu == ours.config.quick_gelu
        a, b = ours.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_is_what_open_clip_loads(texts, tmp_path, tmp_path_factory):
    """open_clip's own loaders accept our export: `create_model(name, pretrained=file)` and `local-dir:`."""
    ours = clip_pacl.load("tiny")
    export_open_clip(ours, tmp_path / "tiny.pt")
    name = _register_tiny("tiny", tmp_path_factory)
    reference = open_clip.create_model(name, pretrained=str(tmp_path / "tiny.pt")).eval()
    assert_same_outputs(reference, ours, 64, texts)
    tiny = clip_pacl.load("tiny-rn")
    export_open_clip(tiny, tmp_path / "tiny_dir")
    reference = open_clip.create_model(f"local-dir:{tmp_path / 'tiny_dir'}").eval()
    assert_same_outputs(reference, tiny, 64, texts)
