"""Backbone-model checkpoint directories: self-contained, loadable offline.

Layout: `config.json` (`"model_type": "backbone"`, the BackboneConfig, how to rebuild the timm image tower and its
data config), `model.safetensors` (towers + heads) and `text/` (the text model's config and tokenizer files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clip_pacl.checkpoint.files import CONFIG_NAME, WEIGHTS_NAME, check_state_matches, read_weights, save_json
from clip_pacl.errors import CheckpointError
from clip_pacl.limits import check_model_size
from clip_pacl.models.backbone import BackboneCLIP, BackboneConfig, checked_model_args, import_timm, import_transformers

TEXT_DIR = "text"


def save_backbone(model: BackboneCLIP, out_dir: str | Path) -> Path:
    """Write `model` as a backbone checkpoint directory (what `clip_pacl.save` calls for a backbone model)."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.text.config.save_pretrained(out / TEXT_DIR)
    model.tokenizer.save_pretrained(out / TEXT_DIR)
    save_model(model, str(out / WEIGHTS_NAME), metadata={"format": "pt"})  # drops tied duplicates safely
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.data_config.items()}
    cfg = {"model_type": "backbone", "backbone": model.config.to_dict(), "image": model.image_info,
           "image_data_config": data_config, "spec": model.config.to_spec()}
    save_json(cfg, out / CONFIG_NAME)
    return out


def load_backbone(path: str | Path, device: str | torch.device | None = None) -> BackboneCLIP:
    """Read a directory written by `save_backbone` (what `clip_pacl.load` calls for model_type "backbone").

    The towers are first built on the meta device: the model's size is checked and the weights file's declared
    tensors compared with it before the real model is built and any tensor data is read."""
    from safetensors.torch import load_model

    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
        config = BackboneConfig.from_dict(cfg["backbone"])
        image_info = cfg["image"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a backbone checkpoint ({e})") from None
    if not isinstance(image_info, dict) or not isinstance(image_info.get("arch"), str):
        raise CheckpointError(f"{path / CONFIG_NAME}: image must be an object naming a timm arch")
    model_args = checked_model_args(image_info.get("model_args") or {}, path / CONFIG_NAME)
    timm, transformers = import_timm(), import_transformers()
    if not timm.is_model(image_info["arch"]):  # not a hub or local-dir name, which would bring its own model_args
        raise CheckpointError(f"{path / CONFIG_NAME} names no timm model ('{image_info['arch']}')")
    text_config = transformers.AutoConfig.from_pretrained(path / TEXT_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / TEXT_DIR)

    def build() -> BackboneCLIP:
        try:
            visual = timm.create_model(image_info["arch"], pretrained=False, num_classes=0, **model_args)
            text = transformers.AutoModel.from_config(text_config)
        except (TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path / CONFIG_NAME} does not describe towers timm and transformers "
                                  f"build ({' '.join(str(e).split())[:200]})") from None
        return BackboneCLIP(config, visual, text, tokenizer, image_info)

    with torch.device("meta"):
        _check_declared(build(), path / WEIGHTS_NAME)
    model = build()
    missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    saved = cfg.get("image_data_config")
    if isinstance(saved, dict) and saved:
        model.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return model.to(device) if device is not None else model


def _check_declared(model: BackboneCLIP, weights: Path) -> None:
    """The meta-device model's size, and every tensor the weights file declares against the model's (the file
    leaves out tied duplicates, which `load_model` restores, so only its own entries are compared)."""
    check_model_size(model, str(weights.parent))
    targets = model.state_dict()
    declared = read_weights(weights, meta=True)
    check_state_matches({k: targets[k] for k in declared if k in targets}, declared, str(weights))
