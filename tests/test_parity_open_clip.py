"""Weights saved by open_clip (and OpenAI's formats) load into clip_pacl and compute the same numbers.

Models are open_clip models with every weight randomised (`helpers.randomize_`: no zero bias or identity norm
that would hide a swapped key; no downloads), saved to disk the way open_clip and OpenAI save them, then read
back by `clip_pacl.load` with the architecture inferred from the shapes. MaskCLIP's dense tokens are checked
against a definition written here from open_clip's modules.
"""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clip_pacl
from clip_pacl.checkpoint import export_open_clip, load_with_source
from clip_pacl.tokenizer import tokenize
from helpers import CAPTIONS, fixed_images, open_clip_diff, preset_dict, randomize_, require

open_clip = require("open_clip")

TOL = 1e-5


def _open_clip_model(name: str, tmp_path_factory, **kwargs):
    if name in ("tiny", "tiny-rn"):
        name = _register_tiny(name, tmp_path_factory)
    torch.manual_seed(0)
    return randomize_(open_clip.create_model(name, **kwargs)).eval()


def _register_tiny(preset: str, tmp_path_factory) -> str:
    """Our tiny preset as an open_clip model config, registered the way users add their own configs."""
    cfg_dir = tmp_path_factory.mktemp("oc_configs")
    (cfg_dir / f"{preset}-test.json").write_text(json.dumps(preset_dict(preset)))
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
def tiny_rn_quickgelu(tmp_path_factory):
    return _open_clip_model("tiny-rn", tmp_path_factory, force_quick_gelu=True)


@pytest.fixture(scope="module")
def texts():
    return tokenize(CAPTIONS)


def assert_same_outputs(reference, ours, image_size: int) -> None:
    """Raw and normalised image/text features and logits agree with open_clip's within 1e-5.

    Both CLIPs' forward() only normalises encode_image/encode_text and scales the dot products, so one
    encoder pass per model gives all three (the big towers are slow on a shared CPU).
    """
    assert open_clip_diff(reference, ours, image_size) < TOL


def _save(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def test_vit_b32_quickgelu_state_dict(vit_b32_quickgelu, tmp_path):
    path = tmp_path / "vit_b32.pt"
    _save(vit_b32_quickgelu.state_dict(), path)
    model, source = load_with_source(path)
    assert source.format == "open_clip"
    assert model.config.quick_gelu and model.config.vision.patch_size == 32 and model.config.vision.layers == 12
    assert model.config.vision.heads == 12 and model.config.text.heads == 8 and model.embed_dim == 512
    assert_same_outputs(vit_b32_quickgelu, model, 224)


def test_training_checkpoint_with_ddp_prefix(tiny_quickgelu, tmp_path):
    """open_clip's training checkpoints wrap the weights: {"epoch", "state_dict": {"module.visual...": ...}}."""
    state = {f"module.{k}": v for k, v in tiny_quickgelu.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.bin")
    assert_same_outputs(tiny_quickgelu, clip_pacl.load(tmp_path / "epoch_3.bin"), 64)


def test_rn50_quickgelu_state_dict(rn50_quickgelu, tmp_path):
    path = tmp_path / "rn50.safetensors"
    _save(rn50_quickgelu.state_dict(), path)
    model = clip_pacl.load(path)
    assert model.config.vision.layers == (3, 4, 6, 3) and model.config.vision.width == 64
    assert model.embed_dim == 1024 and model.image_size == 224
    assert_same_outputs(rn50_quickgelu, model, 224)


def test_vit_b32_gelu_needs_the_override(vit_b32_gelu, texts, tmp_path):
    path = tmp_path / "vit_b32_gelu.safetensors"
    _save(vit_b32_gelu.state_dict(), path)
    model = clip_pacl.load(path, quick_gelu=False)
    assert not model.config.quick_gelu
    assert_same_outputs(vit_b32_gelu, model, 224)
    # Without the override a bare state dict means QuickGELU (OpenAI's convention): different numbers.
    default = clip_pacl.load(path).eval()
    assert default.config.quick_gelu
    with torch.no_grad():
        assert (default.encode_text(texts) - vit_b32_gelu.encode_text(texts)).abs().max() > 1e-3


def test_tiny_state_dict_takes_heads_from_the_matching_preset(tiny_quickgelu, tmp_path):
    # tiny uses 32-wide heads, which the weights cannot show; the shapes match the preset, which says so.
    torch.save(tiny_quickgelu.state_dict(), tmp_path / "tiny.pt")
    model = clip_pacl.load(tmp_path / "tiny.pt")
    assert model.config.vision.heads == 4 and model.config.text.heads == 4
    assert_same_outputs(tiny_quickgelu, model, 64)


def test_sidecar_open_clip_config_and_explicit_config(tiny_quickgelu, tmp_path):
    torch.save(tiny_quickgelu.state_dict(), tmp_path / "weights.pt")
    model_cfg = {**preset_dict("tiny"), "quick_gelu": True}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    assert_same_outputs(tiny_quickgelu, clip_pacl.load(tmp_path / "weights.pt"), 64)
    explicit = clip_pacl.load(tmp_path / "weights.pt", config="tiny-quickgelu")
    assert_same_outputs(tiny_quickgelu, explicit, 64)


def test_open_clip_hub_layout_directory(tiny_quickgelu, tmp_path):
    export_dir = tmp_path / "repo"
    export_open_clip(clip_pacl.load(_saved(tiny_quickgelu, tmp_path)), export_dir)
    model, source = load_with_source(export_dir)
    assert source.format == "open_clip" and source.location.endswith("open_clip_model.safetensors")
    assert_same_outputs(tiny_quickgelu, model, 64)


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
    assert_same_outputs(reference, model, 64)


def test_openai_plain_state_dict_rn(tmp_path, tmp_path_factory):
    reference = _open_clip_model("tiny-rn", tmp_path_factory, force_quick_gelu=True)
    state = {**reference.state_dict(), "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "RN.pt")
    model, source = load_with_source(tmp_path / "RN.pt")
    assert source.format == "openai"
    assert next(model.parameters()).dtype == torch.float32
    reference.half().float()  # the same fp16 rounding the file went through
    assert_same_outputs(reference, model, 64)


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_round_trip_through_open_clip_is_exact(preset, tmp_path):
    ours = randomize_(clip_pacl.load(preset))
    for out in (tmp_path / "oc.pt", tmp_path / "oc.safetensors"):
        export_open_clip(ours, out)
        back = clip_pacl.load(out)
        assert back.config.vision == ours.config.vision and back.config.text == ours.config.text
        assert back.config.quick_gelu == ours.config.quick_gelu
        a, b = ours.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_is_what_open_clip_loads(tmp_path, tmp_path_factory):
    """open_clip's own loaders accept our export: `create_model(name, pretrained=file)` and `local-dir:`."""
    ours = randomize_(clip_pacl.load("tiny"))
    export_open_clip(ours, tmp_path / "tiny.pt")
    name = _register_tiny("tiny", tmp_path_factory)
    reference = open_clip.create_model(name, pretrained=str(tmp_path / "tiny.pt")).eval()
    assert_same_outputs(reference, ours, 64)
    tiny = randomize_(clip_pacl.load("tiny-rn"))
    export_open_clip(tiny, tmp_path / "tiny_dir")
    reference = open_clip.create_model(f"local-dir:{tmp_path / 'tiny_dir'}").eval()
    assert_same_outputs(reference, tiny, 64)


# ---------------------------------------------------------------- dense tokens from an independent definition
def _ours(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    return clip_pacl.load(tmp_path / "weights.pt").eval()


def _open_clip_vit_maskclip(visual, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP (Zhou et al. 2022) on open_clip's ViT: every block but the last as is; in the last, the attention
    is replaced by its value path, x + out_proj(v_proj(ln_1(x))), then the MLP; then ln_post and proj."""
    x = visual._embeds(images)  # (B, 1 + N, width)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    width = x.shape[-1]
    value = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
    x = x + last.attn.out_proj(value)
    x = x + last.mlp(last.ln_2(x))
    return visual.ln_post(x) @ visual.proj  # (B, 1 + N, D)


def _open_clip_rn_pool_inputs(visual, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ModifiedResNet trunk, then the attention pool's input sequence: (B, 1 + HW, C) (mean first)."""
    fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))  # (B, C, h, w)
    x = fmap.flatten(2).transpose(1, 2)
    return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + visual.attnpool.positional_embedding


def _open_clip_rn_maskclip(visual, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP on a ResNet: each position through the pool's value and output projections, c_proj(v_proj(x))."""
    pool = visual.attnpool
    return pool.c_proj(pool.v_proj(_open_clip_rn_pool_inputs(visual, images)))


def _open_clip_rn_tokens(visual, images: torch.Tensor) -> torch.Tensor:
    """open_clip's attention pool with every position as a query (full attention over the whole sequence)."""
    pool = visual.attnpool
    x = _open_clip_rn_pool_inputs(visual, images).transpose(0, 1)  # (1 + HW, B, C), sequence first
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out.transpose(0, 1)  # (B, 1 + HW, D)


def test_vit_maskclip_is_the_last_blocks_value_path(tiny_quickgelu, tmp_path):
    ours, images = _ours(tiny_quickgelu, tmp_path), fixed_images(64)
    with torch.no_grad():
        expected = _open_clip_vit_maskclip(tiny_quickgelu.visual, images)
        got = ours.encode_image_tokens(images, dense="maskclip")
        tokens = ours.encode_image_tokens(images, dense="tokens")
    assert got.shape == (2, 1 + 8 * 8, 128)
    assert (got - expected).abs().max() < TOL
    assert (tokens[:, 1:] - got[:, 1:]).abs().max() > 1e-2  # the value path is not the full attention


def test_resnet_maskclip_is_the_pools_value_path(tiny_rn_quickgelu, tmp_path):
    ours, images = _ours(tiny_rn_quickgelu, tmp_path), fixed_images(64)
    with torch.no_grad():
        expected = _open_clip_rn_maskclip(tiny_rn_quickgelu.visual, images)
        got = ours.encode_image_tokens(images, dense="maskclip")
    assert got.shape == (2, 1 + 2 * 2, 128)
    assert (got - expected).abs().max() < TOL  # index 0 too: the mean token's value path, as the ViT's class token


def test_resnet_tokens_are_the_pool_with_every_position_as_query(tiny_rn_quickgelu, tmp_path):
    ours, images = _ours(tiny_rn_quickgelu, tmp_path), fixed_images(64)
    with torch.no_grad():
        expected = _open_clip_rn_tokens(tiny_rn_quickgelu.visual, images)
        got = ours.encode_image_tokens(images, dense="tokens")
    assert (expected[:, 0] - tiny_rn_quickgelu.encode_image(images)).abs().max() < TOL  # the definition is right
    assert got.shape == (2, 1 + 2 * 2, 128)
    assert (got - expected).abs().max() < TOL


def test_resnet_tokens_and_maskclip_differ(tiny_rn_quickgelu, tmp_path):
    """MaskCLIP's value path is not the attention pool: on a ResNet the two dense modes give different patches."""
    ours, images = _ours(tiny_rn_quickgelu, tmp_path), fixed_images(64)
    with torch.no_grad():
        tokens = ours.encode_image_tokens(images, dense="tokens")
        maskclip = ours.encode_image_tokens(images, dense="maskclip")
    assert (tokens[:, 1:] - maskclip[:, 1:]).abs().max() > 1e-2
