"""PACL checkpoint directories: the base CLIP's weights plus the trainable heads.

Layout: `config.json` (`"model_type": "pacl"`, the CLIP config under `clip`, the PACL config under `pacl`),
`model.safetensors` (the base CLIP's weights, copied in so the directory is self-contained and stays right when
the last blocks were fine-tuned) and `pacl.safetensors` (embedders, logit scale).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clip_pacl.checkpoint.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    assign_state,
    check_state_matches,
    read_weights,
    save_json,
    save_weights,
)
from clip_pacl.config import CLIPConfig
from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.limits import check_model_size
from clip_pacl.models.clip import CLIP
from clip_pacl.models.pacl import PACL, PACLConfig

PACL_WEIGHTS_NAME = "pacl.safetensors"


def save_pacl(model: PACL, out_dir: str | Path) -> Path:
    """Write `model` as a PACL checkpoint directory (what `clip_pacl.save` calls for a PACL model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.clip.state_dict(), out / WEIGHTS_NAME)
    save_weights({k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}, out / PACL_WEIGHTS_NAME)
    save_json({"model_type": "pacl", "clip": model.clip.config.to_dict(), "pacl": model.config.to_dict()},
              out / CONFIG_NAME)
    return out


def load_pacl(path: str | Path, device: str | torch.device | None = None) -> PACL:
    """Read a directory written by `save_pacl` (what `clip_pacl.load` calls for model_type "pacl").

    The model is built on the meta device, its size checked and both weights files' declared tensors compared with
    it before any tensor data is read or any model memory allocated."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME, PACL_WEIGHTS_NAME):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a PACL checkpoint (no {name})")
    config_file = path / CONFIG_NAME
    try:
        cfg = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{config_file} is not valid JSON") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "pacl" or "clip" not in cfg:
        raise CheckpointError(f"{config_file} does not describe a PACL model")
    if not isinstance(cfg.get("pacl", {}), dict):
        raise ConfigError(f"{config_file}: pacl must be an object of PACL settings")
    clip_config = CLIPConfig.from_dict(cfg["clip"], str(config_file))
    try:
        pacl_config = PACLConfig.from_dict(cfg.get("pacl", {}))
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from None
    with torch.device("meta"):
        model = PACL(CLIP(clip_config), pacl_config)
    check_model_size(model, str(path))
    clip_file, heads_file = path / WEIGHTS_NAME, path / PACL_WEIGHTS_NAME
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    check_state_matches(model.clip.state_dict(), read_weights(clip_file, meta=True), str(clip_file))
    check_state_matches(heads, read_weights(heads_file, meta=True), str(heads_file))
    state = {f"clip.{k}": v for k, v in read_weights(clip_file).items()} | read_weights(heads_file)
    assign_state(model, state, str(path))
    return model.to(device) if device is not None else model
