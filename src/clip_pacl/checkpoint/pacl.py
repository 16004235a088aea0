"""PACL checkpoint directories: the base CLIP's weights plus the trainable heads.

Layout: `config.json` (`"model_type": "pacl"`, the CLIP config under `clip`, the PACL config under `pacl`),
`model.safetensors` (the base CLIP's weights, copied in so the directory is self-contained and stays right when
the last blocks were fine-tuned) and `pacl.safetensors` (embedders, logit scale).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from clip_pacl.checkpoint.files import CONFIG_NAME, WEIGHTS_NAME, load_state_into, save_json, save_weights
from clip_pacl.config import CLIPConfig
from clip_pacl.errors import CheckpointError
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
    """Read a directory written by `save_pacl` (what `clip_pacl.load` calls for model_type "pacl")."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME, PACL_WEIGHTS_NAME):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a PACL checkpoint (no {name})")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    if cfg.get("model_type") != "pacl" or "clip" not in cfg:
        raise CheckpointError(f"{path}/{CONFIG_NAME} does not describe a PACL model")
    clip = CLIP(CLIPConfig.from_dict(cfg["clip"]))
    map_location = str(device or "cpu")
    load_state_into(clip, load_file(str(path / WEIGHTS_NAME), device=map_location), str(path / WEIGHTS_NAME))
    model = PACL(clip, PACLConfig.from_dict(cfg.get("pacl", {})))
    heads = load_file(str(path / PACL_WEIGHTS_NAME), device=map_location)
    result = model.load_state_dict(heads, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("clip.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path / PACL_WEIGHTS_NAME} does not match the PACL model "
                              f"(missing: {missing[:3]}, unexpected: {result.unexpected_keys[:3]})")
    return model.to(device) if device is not None else model
