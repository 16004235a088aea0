"""Our checkpoint format (a directory with `model.safetensors` + `config.json`) and `load()` for every source.

`load` reads whatever a user is likely to have: our directories (CLIP, PACL, backbone models), HF CLIP
directories, OpenAI `.pt` files, open_clip state dicts and configs, presets and hub names. Each source
is detected from its contents, converted by an explicit name map, and loaded strictly, so a checkpoint
that does not match its architecture fails loudly instead of leaving weights random.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_pacl.checkpoint import backbone, convert_hf, convert_open_clip, convert_openai, pacl
from clip_pacl.checkpoint.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    is_torchscript_file,
    load_state_into,
    read_weights,
    save_json,
    save_weights,
)
from clip_pacl.checkpoint.rundir import resolve_run_dir
from clip_pacl.config import CLIPConfig, available_presets
from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.models.backbone import build_backbone
from clip_pacl.models.clip import CLIP
from clip_pacl.models.quantize import check_not_quantized, check_quantization
from clip_pacl.models.quantize import quantize as quantize_model

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Our other model types: (save, load) by config.json's `model_type`.
MODEL_TYPES = {"pacl": (pacl.save_pacl, pacl.load_pacl), "backbone": (backbone.save_backbone, backbone.load_backbone)}


@dataclass(frozen=True)
class Source:
    """Where a model's weights came from, as `clip-pacl info` reports it."""

    format: str  # clip_pacl, pacl, backbone, hf, open_clip, openai, openai_torchscript, open_clip_config, preset
    location: str  # a path, or the preset name
    hub_id: str | None = None
    revision: str | None = None  # the hub snapshot's commit, when the weights came from the hub


# ---------------------------------------------------------------------------------------------- saving
def save(model: nn.Module, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write `model` as a clip-pacl checkpoint directory (atomically: files are renamed into place).

    Models that carry more than a CLIP (PACL heads, third-party backbones) have their own writer in
    `MODEL_TYPES` (by the model's `model_type`), and `load` dispatches back to its reader by `config.json`'s.
    """
    check_not_quantized(model, "save")
    out = Path(out_dir)
    model_type = getattr(model, "model_type", "clip")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type][0](model, out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / WEIGHTS_NAME)
    save_json({"model_type": "clip", **model.config.to_dict(), **(extra_config or {})}, out / CONFIG_NAME)
    return out


# ---------------------------------------------------------------------------------------------- loading
def load(
    src: str | Path,
    *,
    pretrained: str | None = None,
    config: str | Path | CLIPConfig | None = None,
    quick_gelu: bool | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> nn.Module:
    """Load a model from any source clip-pacl reads: a clip-pacl checkpoint or training run dir, a Hugging Face
    CLIP dir, an OpenAI `.pt`, an open_clip state dict or model-config JSON, a preset, a hub name (README,
    "Python API"; `docs/architecture.md`).

    `pretrained` names weights for a preset as open_clip does (`load("ViT-B-32", pretrained="openai")`)
    or is a weights file for it. `config` (a preset name, an open_clip JSON or a CLIPConfig) overrides the
    architecture inferred from a bare state dict. `quick_gelu`, when given, overrides the activation;
    bare state dicts otherwise imply QuickGELU, OpenAI's convention. `quantize="int8"` returns the model
    int8-quantized for CPU inference, in eval mode (`models/quantize.py`).
    """
    return load_with_source(src, pretrained=pretrained, config=config, quick_gelu=quick_gelu, device=device,
                            quantize=quantize)[0]


def load_with_source(
    src: str | Path,
    *,
    pretrained: str | None = None,
    config: str | Path | CLIPConfig | None = None,
    quick_gelu: bool | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> tuple[nn.Module, Source]:
    """`load`, also saying where the weights came from (format, path, hub id)."""
    check_quantization(quantize)  # before minutes of loading
    model, source = _load_any(src, pretrained, config, quick_gelu, device)
    return quantize_model(model, quantize, inplace=True), source


def _load_any(src: str | Path, pretrained: str | None, config: str | Path | CLIPConfig | None,
              quick_gelu: bool | None, device: str | torch.device | None) -> tuple[nn.Module, Source]:
    from clip_pacl.checkpoint import hub

    src = resolve_run_dir(src)  # a training run dir means its final/ (or newest) model
    text = str(src)
    if text.startswith("backbone:"):  # pretrained timm + transformers towers with new heads (models/backbone.py)
        model = build_backbone(text)
        return (model.to(device) if device is not None else model), Source("backbone", text)
    if pretrained is not None:
        if Path(pretrained).is_file():
            model, source = _load_file(Path(pretrained), config or text, quick_gelu)
        else:
            repo = hub.pretrained_repo(text, pretrained)
            snapshot = hub.download(repo)
            model, source = _load_dir(snapshot, quick_gelu, device)
            source = replace(source, hub_id=repo, revision=hub.snapshot_revision(snapshot))
    elif text.startswith(hub.HF_HUB_PREFIX):
        repo = text.removeprefix(hub.HF_HUB_PREFIX)
        snapshot = hub.download(repo)
        model, source = _load_dir(snapshot, quick_gelu, device)
        source = replace(source, hub_id=repo, revision=hub.snapshot_revision(snapshot))
    elif not Path(src).exists() and _looks_like_repo_id(text):
        try:
            snapshot = hub.download(text)
        except CheckpointError as e:  # it may just as well have been a mistyped local path
            raise CheckpointError(f"'{text}' is not a local file or directory, and {e}") from None
        model, source = _load_dir(snapshot, quick_gelu, device)
        source = replace(source, hub_id=text, revision=hub.snapshot_revision(snapshot))
    else:
        model, source = _load_local(Path(src), config, quick_gelu, device)
    if device is not None:
        model = model.to(device)
    return model, source


def _looks_like_repo_id(text: str) -> bool:
    """`org/name` as on the Hub, but not a path someone mistyped (`runs/model.pt`, `./x/y`)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith(".") and \
        not text.lower().endswith((*WEIGHT_SUFFIXES, ".json"))


def _load_local(path: Path, config: str | Path | CLIPConfig | None, quick_gelu: bool | None,
                device: str | torch.device | None) -> tuple[nn.Module, Source]:
    if path.is_dir():
        return _load_dir(path, quick_gelu, device)
    if path.is_file():
        in_checkpoint_dir = path.name == CONFIG_NAME or path.name in (WEIGHTS_NAME, "pytorch_model.bin")
        if in_checkpoint_dir and (path.parent / CONFIG_NAME).is_file():
            return _load_dir(path.parent, quick_gelu, device)
        if path.suffix == ".json":
            model = CLIP(_with_quick_gelu(_read_open_clip_config(path), quick_gelu))
            return model, Source("open_clip_config", str(path))
        return _load_file(path, config, quick_gelu)
    name = str(path)
    if name in available_presets() or name.removesuffix("-quickgelu") in available_presets():
        return CLIP(_with_quick_gelu(CLIPConfig.from_name(name), quick_gelu)), Source("preset", name)
    if path.suffix or os.sep in name:
        raise CheckpointError(f"{path} does not exist")
    raise ConfigError(f"'{name}' is neither a file, a directory, a preset nor a Hugging Face repo id "
                      f"(presets: {', '.join(available_presets())})")


def _load_dir(path: Path, quick_gelu: bool | None, device: str | torch.device | None) -> tuple[nn.Module, Source]:
    config_file = path / CONFIG_NAME
    data = _read_json(config_file) if config_file.is_file() else None
    if data is not None and convert_hf.is_hf_config(data):
        config, state = convert_hf.read_hf_dir(path)
        return _build(_with_quick_gelu(config, quick_gelu), state, str(path)), Source("hf", str(path))
    if data is not None and "model_type" in data:
        model_type = data["model_type"]
        if model_type in MODEL_TYPES:
            return MODEL_TYPES[model_type][1](path, device), Source(model_type, str(path))
        if model_type != "clip":
            raise CheckpointError(f"{config_file} has model_type '{model_type}' (known: clip, "
                                  f"{', '.join(MODEL_TYPES)})")
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path} has a clip-pacl {CONFIG_NAME} but no {WEIGHTS_NAME}")
        config = CLIPConfig.from_dict({k: v for k, v in data.items() if k != "model_type"})
        state = read_weights(path / WEIGHTS_NAME)
        return _build(_with_quick_gelu(config, quick_gelu), state, str(path)), Source("clip_pacl", str(path))
    if (path / OPEN_CLIP_CONFIG_NAME).is_file():
        weights = next((path / n for n in OPEN_CLIP_WEIGHT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} has {OPEN_CLIP_CONFIG_NAME} but no weights "
                                  f"({', '.join(OPEN_CLIP_WEIGHT_NAMES)})")
        return _load_file(weights, path / OPEN_CLIP_CONFIG_NAME, quick_gelu)
    raise CheckpointError(f"{path} is not a checkpoint directory (no clip-pacl or Hugging Face {CONFIG_NAME}, "
                          f"no {OPEN_CLIP_CONFIG_NAME})")


def _load_file(path: Path, config: str | Path | CLIPConfig | None, quick_gelu: bool | None) -> tuple[CLIP, Source]:
    """A bare state dict (open_clip, OpenAI, or ours): the architecture comes from `config`, an
    `open_clip_config.json` beside the file, or the tensor shapes."""
    torchscript = is_torchscript_file(path)
    state = read_weights(path)
    if convert_open_clip.is_our_state(state):
        fmt, ours = "clip_pacl", state
    elif convert_open_clip.is_open_clip_state(state):
        openai = convert_openai.is_openai_state(state)
        fmt = "openai_torchscript" if torchscript else "openai" if openai else "open_clip"
        ours = convert_open_clip.from_open_clip(state)
    elif any(k.startswith(("text_model.", "vision_model.")) for k in state):
        raise CheckpointError(f"{path} holds Hugging Face CLIP weights; load the directory with its {CONFIG_NAME}")
    else:
        raise CheckpointError(f"{path} is not a checkpoint clip-pacl can read: no CLIP image and text towers in it "
                              f"(e.g. key '{next(iter(state))}')")
    sidecar = path.parent / OPEN_CLIP_CONFIG_NAME
    if config is None and sidecar.is_file():
        config = sidecar
    if config is None:
        oc_state = state if fmt != "clip_pacl" else convert_open_clip.to_open_clip(state)
        cfg = convert_open_clip.infer_config(oc_state, quick_gelu=quick_gelu, name=path.stem)
    else:
        cfg = _with_quick_gelu(_resolve_config(config), quick_gelu)
    return _build(cfg, ours, str(path)), Source(fmt, str(path))


def _resolve_config(config: str | Path | CLIPConfig) -> CLIPConfig:
    if isinstance(config, CLIPConfig):
        return config
    path = Path(config)
    return _read_open_clip_config(path) if path.is_file() else CLIPConfig.from_name(str(config))


def _read_open_clip_config(path: Path) -> CLIPConfig:
    """open_clip's model-config JSON, bare or wrapped as in hub repos' `open_clip_config.json` (`model_cfg`)."""
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("model_cfg"), dict):
        data = data["model_cfg"]
    name = path.parent.name if path.name == OPEN_CLIP_CONFIG_NAME else path.stem
    return CLIPConfig.from_open_clip_dict(data, name=name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a text JSON file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _build(config: CLIPConfig, state: dict[str, torch.Tensor], source: str) -> CLIP:
    """A CLIP holding exactly `state` (as fp32). The model is built on the meta device and the checkpoint's
    tensors are assigned to it, so loading skips the random initialisation it would overwrite anyway."""
    with torch.device("meta"):
        model = CLIP(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    load_state_into(model, state, source, assign=True)
    unset = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:  # a non-persistent buffer: no checkpoint holds it, so it must be computed in __init__ instead
        raise CheckpointError(f"{source}: the model has tensors no checkpoint sets (e.g. {unset[0]})")
    return model


def _with_quick_gelu(config: CLIPConfig, quick_gelu: bool | None) -> CLIPConfig:
    return config if quick_gelu is None else replace(config, quick_gelu=quick_gelu)

