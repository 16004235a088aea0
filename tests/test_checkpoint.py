"""`clip_pacl.load` / `save`: our directory format, source detection, model-type dispatch, and errors."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import clip_pacl
from clip_pacl.checkpoint import load_with_source, read_weights
from clip_pacl.errors import CheckpointError, ClipPaclError, ConfigError
from clip_pacl.formats.convert_open_clip import infer_config, to_open_clip
from clip_pacl.models.pacl import PACL
from helpers import randomize_


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_save_load_round_trip_is_exact(preset, tmp_path):
    model = randomize_(clip_pacl.load(preset))
    clip_pacl.save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "clip"
    for src in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors", tmp_path / "ckpt" / "config.json"):
        back, source = load_with_source(src)
        assert source.format == "clip_pacl" and source.location == str(tmp_path / "ckpt")
        assert back.config == model.config and same_state(model, back)


def test_pacl_directory_dispatches_on_model_type(tmp_path):
    pacl = randomize_(PACL(clip_pacl.load("tiny")))  # every weight differs from a fresh initialisation
    clip_pacl.save(pacl, tmp_path / "pacl")  # PACL has its own writer (checkpoint/pacl.py)
    assert json.loads((tmp_path / "pacl" / "config.json").read_text())["model_type"] == "pacl"
    back, source = load_with_source(tmp_path / "pacl")
    assert isinstance(back, PACL) and source.format == "pacl"
    assert same_state(pacl, back)


def test_unknown_model_type_is_named(tmp_path):
    clip_pacl.save(clip_pacl.load("tiny"), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": "blip"}))
    with pytest.raises(CheckpointError, match="model_type 'blip'"):
        clip_pacl.load(tmp_path)


def test_bare_state_dict_of_ours(tmp_path):
    model = randomize_(clip_pacl.load("tiny-rn"))
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    back, source = load_with_source(tmp_path / "ours.pt", quick_gelu=False)
    assert source.format == "clip_pacl" and back.config.vision == model.config.vision
    assert same_state(model, back)


def test_infer_config_matches_every_preset():
    for name in ["RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16", "ViT-L-14-336", "tiny", "tiny-rn"]:
        config = clip_pacl.CLIPConfig.from_name(name)
        with torch.device("meta"):
            state = to_open_clip(clip_pacl.CLIP(config).state_dict())
        inferred = infer_config(state)
        assert (inferred.vision, inferred.text, inferred.embed_dim) == (config.vision, config.text, config.embed_dim)
        assert inferred.quick_gelu and not infer_config(state, quick_gelu=False).quick_gelu


def test_quick_gelu_override_and_device(tmp_path):
    assert clip_pacl.load("tiny", quick_gelu=True).config.quick_gelu
    assert not clip_pacl.load("tiny-quickgelu", quick_gelu=False).config.quick_gelu
    model = clip_pacl.load("tiny", device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_fp16_weights_load_as_fp32(tmp_path):
    model = clip_pacl.load("tiny")
    save_file({k: v.half() for k, v in to_open_clip(model.state_dict()).items()}, str(tmp_path / "half.safetensors"))
    back = clip_pacl.load(tmp_path / "half.safetensors")
    assert all(p.dtype == torch.float32 for p in back.parameters())
    assert torch.equal(back.visual.proj, model.visual.proj.half().float())


class _Exploit:
    """A pickle that runs code when unpickled without weights_only: it must never be executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickles_are_never_trusted(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"visual.conv1.weight": _Exploit(str(marker))}, f, protocol=2)
    torch.save({"model": _Exploit(str(marker))}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="not a checkpoint clip-pacl can read"):
            clip_pacl.load(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["text", "truncated", "not_tensors", "no_towers", "json_garbage", "empty_dir",
                                  "hf_weights_without_config", "wrong_shapes"])
def test_unreadable_sources_raise_one_clear_error(case, tmp_path):
    model = clip_pacl.load("tiny")
    if case == "text":
        src = tmp_path / "notes.pt"
        src.write_text("just some text\nacross lines\n")
    elif case == "truncated":
        src = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in to_open_clip(model.state_dict()).items()}, str(src))
        src.write_bytes(src.read_bytes()[:5000])
    elif case == "not_tensors":
        src = tmp_path / "list.pt"
        torch.save([1, 2, 3], src)
    elif case == "no_towers":
        src = tmp_path / "linear.pt"
        torch.save(torch.nn.Linear(2, 2).state_dict(), src)
    elif case == "json_garbage":
        src = tmp_path / "config.json"
        src.write_text("{not json")
    elif case == "empty_dir":
        src = tmp_path
    elif case == "hf_weights_without_config":
        src = tmp_path / "hf.bin"
        torch.save({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}, src)
    else:  # our config with another model's weights
        clip_pacl.save(model, tmp_path / "a")
        clip_pacl.save(clip_pacl.load("tiny-rn"), tmp_path / "b")
        os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
        src = tmp_path / "a"
    with pytest.raises(ClipPaclError) as info:
        clip_pacl.load(src)
    message = str(info.value)
    assert "\n" not in message and str(src) in message


def test_missing_paths_and_unknown_names():
    with pytest.raises(CheckpointError, match="does not exist"):
        clip_pacl.load("runs/exp1/model.pt")
    with pytest.raises(ConfigError, match="neither a file, a directory, a preset"):
        clip_pacl.load("ViT-B-99")


def test_read_weights_unwraps_training_checkpoints(tmp_path):
    state = {"module.visual.proj": torch.ones(2, 2), "module.logit_scale": torch.tensor(1.0)}
    torch.save({"state_dict": state, "epoch": 1, "optimizer": {"lr": 0.1}}, tmp_path / "epoch_1.pt")
    assert set(read_weights(tmp_path / "epoch_1.pt")) == {"visual.proj", "logit_scale"}
