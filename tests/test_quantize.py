"""Int8 inference (`clip_pacl.models.quantize`): features close to float32, the inference speedups still taken, the
int8 layers actually run, clear errors where int8 cannot apply, and `--int8` wired through every command that has it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_pacl
import clip_pacl.models.quantize as quantize_module
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.formats.writers import export
from clip_pacl.models.pacl import PACL
from clip_pacl.models.quantize import Int8Attention, Int8Linear, is_quantized, quantize_int8
from clip_pacl.retrieval.build import weights_fingerprint
from clip_pacl.retrieval.store import ImageIndex
from clip_pacl_app.cli.main import main
from helpers import randomize_, require
from test_inference_paths import record_fast_calls, tokens_with_lengths

COSINE = 0.99


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).min())


@pytest.fixture(scope="module")
def models():
    """A randomised tiny CLIP (nothing left at init values) and its int8 copy."""
    torch.manual_seed(0)
    model = randomize_(clip_pacl.load("tiny")).eval()
    return model, quantize_int8(model)


def test_int8_features_stay_close_to_float32(models):
    model, int8 = models
    images, tokens = torch.randn(6, 3, 64, 64), tokens_with_lengths([3, 9, 17, 40, 60, 77])
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float32  # the original is kept
    with torch.inference_mode():
        pairs = [(model.encode_image(images), int8.encode_image(images)),  # fast paths
                 (model.encode_text(tokens), int8.encode_text(tokens)),
                 (model.visual(images), int8.visual(images)),  # the plain towers
                 (model.text(tokens), int8.text(tokens))]
        pairs += [(model.encode_image_tokens(images, mode), int8.encode_image_tokens(images, mode))
                  for mode in ("tokens", "maskclip")]
    for ours, theirs in pairs:
        assert cosine(ours, theirs) >= COSINE
        assert (ours - theirs).abs().max() > 1e-5  # int8 really ran: not the float32 numbers


def test_fast_paths_apply_to_int8_models_and_run_int8_layers(models, monkeypatch):
    _, int8 = models
    blocks = int8.visual.transformer.resblocks
    assert all(isinstance(b.attn, Int8Attention) and isinstance(b.mlp.c_fc, Int8Linear) for b in blocks)
    layers = {"image first qkv": blocks[0].attn.in_proj, "image last c_fc": blocks[-1].mlp.c_fc,
              "text first out_proj": int8.text.transformer.resblocks[0].attn.out_proj}
    calls = []
    for name, layer in layers.items():
        monkeypatch.setattr(layer, "forward", lambda x, f=layer.forward, name=name: calls.append(name) or f(x))
    taken = []
    record_fast_calls(monkeypatch, int8.visual, 1, taken)
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        fast_features = int8.encode_image(images)
        int8.encode_text(tokens_with_lengths([5, 9]))
        assert taken == [1] and sorted(calls) == sorted(layers)  # each int8 layer ran once, in the fast paths
        plain = int8.visual(images)
    assert cosine(fast_features, plain) >= 0.999  # one-row last block on int8 weights: the same function


def test_int8_refuses_gradients_saving_and_export(models, tmp_path):
    _, int8 = models
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ConfigError, match="no gradients"):
        int8.encode_image(images)  # autograd on: the plain tower, whose int8 layers cannot differentiate
    with pytest.raises(ConfigError, match="no gradients"):
        int8.train()(images, tokens_with_lengths([5, 9]))
    int8.eval()
    with pytest.raises(CheckpointError, match="cannot save an int8"):
        clip_pacl.save(int8, tmp_path / "out")
    with pytest.raises(CheckpointError, match="cannot export an int8"):
        export(int8, "open_clip", tmp_path / "oc")
    with pytest.raises(ConfigError, match="already int8"):
        quantize_int8(int8)
    with pytest.raises(ConfigError, match="float32 weights"):
        quantize_int8(clip_pacl.load("tiny").half())
    assert not (tmp_path / "out").exists()


def test_state_dict_holds_the_int8_weights(models):
    model, int8 = models
    state = int8.state_dict()
    prefix = "visual.transformer.resblocks.0.mlp.c_fc."
    weight, scale = state[prefix + "weight_int8"], state[prefix + "weight_scale"]
    assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0],)
    reference = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert (weight.float() * scale[:, None] - reference).abs().max() <= scale.max() / 2 + 1e-7  # rounding only
    assert weights_fingerprint(int8) == weights_fingerprint(quantize_int8(model)) != weights_fingerprint(model)


def test_engines_and_one_line_errors(monkeypatch):
    model = randomize_(clip_pacl.load("tiny")).eval()
    images = torch.randn(2, 3, 64, 64)
    engines = type(torch.backends.quantized)
    monkeypatch.setattr(engines, "supported_engines", ["qnnpack", "none"])  # as on ARM
    arm = quantize_int8(model)
    assert arm.visual.transformer.resblocks[0].mlp.c_fc.reduce_range is False
    with torch.inference_mode():
        assert cosine(arm.encode_image(images), model.encode_image(images)) >= COSINE
    monkeypatch.setattr(engines, "supported_engines", ["onednn", "none"])
    with pytest.raises(ConfigError, match=r"fbgemm \(x86\) or qnnpack \(ARM\).*has onednn$"):
        quantize_int8(model)
    with pytest.raises(ConfigError, match="quantized engine"):
        clip_pacl.load("no/such/model", quantize="int8")  # refused before any loading
    with pytest.raises(ConfigError, match=r"unknown quantization 'int4' \(int8\)"):
        clip_pacl.load("tiny", quantize="int4")


def test_load_option_pacl_and_resnet():
    loaded = clip_pacl.load("tiny", quantize="int8")
    assert is_quantized(loaded) and not loaded.training
    pacl = PACL(randomize_(clip_pacl.load("tiny"))).eval()
    int8 = quantize_int8(pacl)
    assert isinstance(int8.vision_embedder.linear, Int8Linear) and not is_quantized(pacl)
    images, tokens = torch.randn(2, 3, 64, 64), tokens_with_lengths([5, 9, 12])
    with torch.inference_mode():
        text, text8 = pacl.encode_text(tokens, normalize=True), int8.encode_text(tokens, normalize=True)
        assert cosine(text, text8) >= COSINE
        assert (pacl.similarity(images, text) - int8.similarity(images, text8)).abs().max() < 0.05
    resnet = quantize_int8(clip_pacl.load("tiny-rn"))
    assert isinstance(resnet.text.transformer.resblocks[0].attn, Int8Attention)
    assert not any(isinstance(m, Int8Linear) for m in resnet.visual.modules())  # convolutions: stays float32


# ---------------------------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    generate_synthetic(root / "data", n=8, seed=2, image_size=64)
    torch.manual_seed(0)
    clip_pacl.save(randomize_(clip_pacl.load("tiny")), root / "model")
    return root


@pytest.fixture
def quantized(monkeypatch):
    """Records every int8 quantization the commands ask for."""
    calls = []
    real = quantize_module.quantize_int8
    monkeypatch.setattr(quantize_module, "quantize_int8", lambda m, inplace=False: calls.append(1) or real(m, inplace))
    return calls


def test_index_build_and_search_int8(data, tmp_path, capsys, quantized):
    model, images = str(data / "model"), str(data / "data" / "images")
    for name, flags in (("fp32", []), ("int8", ["--int8"])):
        assert main(["index", "build", "--model", model, "--images", images, "--out", str(tmp_path / name),
                     "--batch-size", "8", *flags, "--json"]) == 0
    assert quantized == [1]
    fp32, int8 = ImageIndex.load(tmp_path / "fp32"), ImageIndex.load(tmp_path / "int8")
    assert (fp32.meta["quantize"], int8.meta["quantize"]) == (None, "int8")
    assert int8.meta["weights"] == fp32.meta["weights"]  # the same float32 weights made both
    assert cosine(torch.as_tensor(np.asarray(fp32.embeddings)), torch.as_tensor(np.asarray(int8.embeddings))) >= COSINE
    capsys.readouterr()
    assert main(["search", str(tmp_path / "int8"), "a red circle", "--int8", "--model", model, "--json"]) == 0
    assert quantized == [1, 1] and len(json.loads(capsys.readouterr().out)["results"]) == 8
    assert main(["index", "update", str(tmp_path / "int8"), "--model", model, "--json"]) == 0
    assert quantized == [1, 1]  # nothing changed: nothing re-embedded


@pytest.mark.parametrize("command", [
    ["zeroshot", "{images}", "--classes", "circle,square,star"],
    ["eval", "zeroshot", "--data", "{data}/shapes.csv", "--template", "a {{}}"],
    ["eval", "retrieval", "--data", "{data}/captions.csv"],
])
def test_commands_encode_in_int8(data, capsys, quantized, command):
    args = [a.format(images=data / "data" / "images", data=data / "data") for a in command]
    args += ["--model", str(data / "model"), "--json"]
    assert main(args) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main([*args, "--int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert quantized == [1] and int8.keys() == fp32.keys()


def test_serve_int8_and_device_errors(data, capsys, monkeypatch, quantized):
    uvicorn = require("uvicorn")

    import clip_pacl_app.web.service as service_module

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(service_module, "WebService", lambda model, *a, **kw: served.append(model) or object())
    monkeypatch.setattr("clip_pacl_app.web.app.create_app", lambda service, **kw: None)
    assert main(["serve", "--model", str(data / "model"), "--int8", "--port", "0"]) == 0
    assert quantized == [1] and is_quantized(served[0])
    capsys.readouterr()
    assert main(["zeroshot", str(data / "data" / "images"), "--classes", "a,b", "--model", "tiny", "--random-weights",
                 "--int8",
                 "--device", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --int8 runs on the CPU only; drop --device meta"
