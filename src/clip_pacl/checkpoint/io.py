"""Our checkpoint format: a directory with `model.safetensors` + `config.json`, and `load()` for every source."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clip_pacl.config import CLIPConfig, available_presets
from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.models.clip import CLIP

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save(model: CLIP, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write `model` as a clip-pacl checkpoint directory (atomically: files are renamed into place)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    cfg = {"model_type": "clip", **model.config.to_dict(), **(extra_config or {})}
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_clip_pacl_dir(path: Path, device: str | torch.device | None = None) -> CLIP:
    cfg_data = json.loads((path / CONFIG_NAME).read_text())
    config = CLIPConfig.from_dict({k: v for k, v in cfg_data.items() if k != "model_type"})
    model = CLIP(config)
    state = load_file(str(path / WEIGHTS_NAME), device=str(device or "cpu"))
    _load_state(model, state, str(path))
    return model


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} tensors (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected tensors (e.g. {result.unexpected_keys[0]})")
        raise CheckpointError(f"{source} does not match the model: {'; '.join(parts)}")


def load(src: str | Path, *, quick_gelu: bool | None = None, device: str | torch.device | None = None) -> CLIP:
    """Load a model from a checkpoint directory, a preset name, or an open_clip model-config JSON.

    Presets and configs give a randomly initialised model. `quick_gelu` overrides the activation
    when the source does not say which one it was trained with.
    """
    path = Path(src)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            model = load_clip_pacl_dir(path, device)
        else:
            raise CheckpointError(f"{path} is not a checkpoint directory (no {CONFIG_NAME} + {WEIGHTS_NAME})")
    elif path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
        config = CLIPConfig.from_open_clip_dict(data, name=path.stem)
        if quick_gelu is not None:
            config = _with_quick_gelu(config, quick_gelu)
        model = CLIP(config)
    elif str(src) in available_presets() or str(src).removesuffix("-quickgelu") in available_presets():
        config = CLIPConfig.from_name(str(src))
        if quick_gelu is not None:
            config = _with_quick_gelu(config, quick_gelu)
        model = CLIP(config)
    elif path.exists():
        raise CheckpointError(f"{path} is not a checkpoint clip-pacl can read")
    else:
        raise ConfigError(f"'{src}' is neither a file, a directory nor a preset (presets: {', '.join(available_presets())})")
    return model.to(device) if device is not None else model


def _with_quick_gelu(config: CLIPConfig, quick_gelu: bool) -> CLIPConfig:
    from dataclasses import replace

    return replace(config, quick_gelu=quick_gelu)
