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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_pacl.checkpoint import backbone, pacl
from clip_pacl.checkpoint.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    assign_state,
    check_state_matches,
    is_torchscript_file,
    read_weights,
    save_json,
    save_weights,
)
from clip_pacl.checkpoint.rundir import resolve_run_dir
from clip_pacl.config import CLIPConfig, available_presets
from clip_pacl.device import resolve_precision
from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.formats import convert_hf, convert_open_clip, convert_openai
from clip_pacl.limits import check_model_size
from clip_pacl.models.backbone import build_backbone
from clip_pacl.models.clip import CLIP
from clip_pacl.models.quantize import check_not_quantized, check_quantization, is_quantized
from clip_pacl.models.quantize import quantize as quantize_model

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Our other model types: (save, load) by config.json's `model_type`.
MODEL_TYPES = {"pacl": (pacl.save_pacl, pacl.load_pacl), "backbone": (backbone.save_backbone, backbone.load_backbone)}


RANDOM_FORMATS = ("preset", "open_clip_config")  # sources that hold no weights: a random initialisation


class RandomWeightsError(ConfigError):
    """A preset / model-config JSON where the caller said it wants trained weights (`random_weights=False`)."""


class RandomWeightsWarning(UserWarning):
    """`load` of a preset or model-config JSON without `random_weights=True`: the model is randomly initialised."""


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
    if getattr(model, "precision", "fp32") != "fp32":
        raise ConfigError(f"this model runs at {model.precision} for inference; load it at fp32 to save it")
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
    precision: str | None = None,
    random_weights: bool | None = None,
) -> nn.Module:
    """Load a model from any source clip-pacl reads: a clip-pacl checkpoint or training run dir, a Hugging Face
    CLIP dir, an OpenAI `.pt`, an open_clip state dict or model-config JSON, a preset, a hub name (README,
    "Python API"; `docs/architecture.md`).

    `pretrained` names weights for a preset as open_clip does (`load("ViT-B-32", pretrained="openai")`, or
    `load("ViT-B-32:openai")`) or is a weights file for it. A preset or model-config JSON without `pretrained`
    gives random weights: `random_weights=True` says that is intended (training from scratch), False refuses
    (`RandomWeightsError`), None (the default) warns as open_clip does (`RandomWeightsWarning`).
    `config` (a preset name, an open_clip JSON or a CLIPConfig) overrides the architecture inferred from a bare
    state dict. `quick_gelu`, when given, overrides the activation;
    bare state dicts otherwise imply QuickGELU, OpenAI's convention. `quantize="int8"` returns the model
    int8-quantized for CPU inference, in eval mode (`models/quantize.py`). `precision` is `fp32` (None, the
    default: exact parity with the source), `bf16` (the towers' weights in bfloat16: about half the memory, and
    faster where the CPU has AMX or AVX-512 BF16, or on a GPU) or `auto` (bf16 where that hardware is there, else
    fp32); the model's `precision` attribute says which ran. Features come back float32 either way.
    """
    return load_with_source(src, pretrained=pretrained, config=config, quick_gelu=quick_gelu, device=device,
                            quantize=quantize, precision=precision, random_weights=random_weights)[0]


def load_with_source(
    src: str | Path,
    *,
    pretrained: str | None = None,
    config: str | Path | CLIPConfig | None = None,
    quick_gelu: bool | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    precision: str | None = None,
    random_weights: bool | None = None,
) -> tuple[nn.Module, Source]:
    """`load`, also saying where the weights came from (format, path, hub id)."""
    check_quantization(quantize)  # before minutes of loading
    resolve_precision(precision)  # an unknown name fails before loading too
    check_precision_with(precision, quantize)
    src, pretrained = split_pretrained(src, pretrained)
    if pretrained is None and is_preset_name(src):
        check_random_weights(f"'{src}' is a preset name", random_weights)  # before building the model
    model, source = _load_any(src, pretrained, config, quick_gelu, device)
    if source.format == "open_clip_config":
        check_random_weights(f"{source.location} is a model-config JSON", random_weights)
    model = quantize_model(model, quantize, inplace=True)
    return set_precision(model, precision), source


def set_precision(model: nn.Module, precision: str | None) -> nn.Module:
    """Run `model`'s towers at `precision` (fp32, bf16 or auto, resolved for the device its weights are on) and
    record the answer as `model.precision`; see `load`. An int8 model is its own precision: bf16 is refused and
    auto is fp32 (its float parts stay float32)."""
    resolved = effective_precision(precision, "int8" if is_quantized(model) else None, next(model.parameters()).device)
    if resolved == "bf16":
        model.set_tower_dtype(torch.bfloat16)
    model.precision = resolved
    return model


def check_precision_with(precision: str | None, quantize: str | None) -> None:
    """Refuse bf16 together with int8 quantization (two different precisions)."""
    if quantize and precision == "bf16":
        raise ConfigError("int8 quantization and --precision bf16 are two different precisions: pick one")


def effective_precision(precision: str | None, quantize: str | None, device: torch.device | str) -> str:
    """The precision a model asked for `precision` runs at on `device`: `resolve_precision`'s answer, or fp32 for an
    int8-quantized one (whose float parts stay float32; bf16 with int8 is refused)."""
    check_precision_with(precision, quantize)
    resolved = resolve_precision(precision, device)  # an unknown name is refused either way
    return "fp32" if quantize else resolved


def is_preset_name(src: str | Path) -> bool:
    """A preset (`ViT-B-32`, `tiny-quickgelu`, ...) that is not also a local path."""
    name = str(src)
    return (name in available_presets() or name.removesuffix("-quickgelu") in available_presets()) and \
        not Path(name).exists()


def split_pretrained(src: str | Path, pretrained: str | None) -> tuple[str | Path, str | None]:
    """open_clip's `MODEL:PRETRAINED` habit: `ViT-B-32:openai` -> ("ViT-B-32", "openai") for a preset name
    (the tag may also be a weights file); anything else, or with `pretrained` given, is returned as it is."""
    text = str(src)
    if pretrained is None and ":" in text and not Path(text).exists():
        arch, tag = text.split(":", 1)
        if tag and is_preset_name(arch):
            return arch, tag
    return src, pretrained


def check_random_weights(what: str, random_weights: bool | None) -> None:
    """Say (or refuse) that a source holds no weights, unless the caller asked for random weights."""
    if random_weights:
        return
    if random_weights is False:
        raise RandomWeightsError(f"{what}: its weights would be random; name pretrained weights "
                                 "(pretrained='openai' or 'ViT-B-32:openai') or pass random_weights=True")
    warnings.warn(f"{what}: no pretrained weights loaded, the model is randomly initialised (name weights with "
                  "pretrained=..., or pass random_weights=True to say this is intended)", RandomWeightsWarning,
                  stacklevel=4)


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
            raise type(e)(f"'{text}' is not a local file or directory, and {e}") from None
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
            model = new_clip(_with_quick_gelu(_read_open_clip_config(path), quick_gelu), str(path))
            return model, Source("open_clip_config", str(path))
        return _load_file(path, config, quick_gelu)
    name = str(path)
    if name in available_presets() or name.removesuffix("-quickgelu") in available_presets():
        return new_clip(_with_quick_gelu(CLIPConfig.from_name(name), quick_gelu), name), Source("preset", name)
    if path.suffix or os.sep in name:
        raise CheckpointError(f"{path} does not exist")
    raise ConfigError(f"'{name}' is neither a file, a directory, a preset nor a Hugging Face repo id "
                      f"(presets: {', '.join(available_presets())})")


def _load_dir(path: Path, quick_gelu: bool | None, device: str | torch.device | None) -> tuple[nn.Module, Source]:
    config_file = path / CONFIG_NAME
    data = _read_json(config_file) if config_file.is_file() else None
    if isinstance(data, dict) and convert_hf.is_hf_config(data):
        config = convert_hf.read_hf_dir(path, meta=True)[0]
        return (_build(_with_quick_gelu(config, quick_gelu), lambda meta: convert_hf.read_hf_dir(path, meta)[1],
                       str(path)), Source("hf", str(path)))
    if data is not None and not isinstance(data, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    if data is not None and "model_type" in data:
        model_type = data["model_type"]
        if not isinstance(model_type, str):
            raise CheckpointError(f"{config_file} has a model_type that is not a string ({model_type!r})")
        if model_type in MODEL_TYPES:
            return MODEL_TYPES[model_type][1](path, device), Source(model_type, str(path))
        if model_type != "clip":
            raise CheckpointError(f"{config_file} has model_type '{model_type}' (known: clip, "
                                  f"{', '.join(MODEL_TYPES)})")
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path} has a clip-pacl {CONFIG_NAME} but no {WEIGHTS_NAME}")
        config = CLIPConfig.from_dict({k: v for k, v in data.items() if k != "model_type"}, str(config_file))
        return (_build(_with_quick_gelu(config, quick_gelu), lambda meta: read_weights(path / WEIGHTS_NAME, meta=meta),
                       str(path)), Source("clip_pacl", str(path)))
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
    state = read_weights(path, meta=True)  # the declared tensors: nothing is read or allocated until they fit
    if convert_open_clip.is_our_state(state):
        fmt, convert = "clip_pacl", dict
    elif convert_open_clip.is_open_clip_state(state):
        openai = convert_openai.is_openai_state(state)
        fmt = "openai_torchscript" if torchscript else "openai" if openai else "open_clip"
        convert = convert_open_clip.from_open_clip
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
    model = _build(cfg, lambda meta: convert(state if meta else read_weights(path)), str(path))
    if config is None and model.logit_bias is not None:  # inferred from the meta tensors, which hold no value
        model.config = replace(model.config, init_logit_bias=float(model.logit_bias))
    return model, Source(fmt, str(path))


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


def _build(config: CLIPConfig, read_state: Callable[[bool], dict[str, torch.Tensor]], source: str) -> CLIP:
    """A CLIP holding exactly the checkpoint's tensors (as fp32). The model is built on the meta device, its size
    checked and every tensor the checkpoint declares (`read_state(True)`: meta tensors, no data) compared with it;
    only then is the data read (`read_state(False)`) and assigned, skipping the random initialisation."""
    with torch.device("meta"):
        model = CLIP(config)
    check_model_size(model, source)
    check_state_matches(model.state_dict(), read_state(True), source)
    assign_state(model, read_state(False), source)
    return model


def new_clip(config: CLIPConfig, source: str) -> CLIP:
    """A randomly initialised CLIP, built once its size on the meta device is within the limit (`limits.py`)."""
    with torch.device("meta"):
        check_model_size(CLIP(config), source)
    return CLIP(config)


def _with_quick_gelu(config: CLIPConfig, quick_gelu: bool | None) -> CLIPConfig:
    return config if quick_gelu is None else replace(config, quick_gelu=quick_gelu)

