"""Write a CLIP in other libraries' formats: Hugging Face `transformers` and open_clip.

Both are lossless renames of our state dict (see `convert_hf` and `convert_open_clip`), so a round trip
gives back bit-identical tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clip_pacl.atomic import atomic_write
from clip_pacl.checkpoint.files import save_json, save_weights
from clip_pacl.checkpoint.io import OPEN_CLIP_CONFIG_NAME, WEIGHT_SUFFIXES, save
from clip_pacl.errors import CheckpointError
from clip_pacl.formats import convert_hf, convert_open_clip
from clip_pacl.formats.hf_processor import write_processor_files
from clip_pacl.models.clip import CLIP
from clip_pacl.models.quantize import check_not_quantized

FORMATS = ("hf", "open_clip", "clip_pacl")


def _plain_state(model: CLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def export_hf(model: CLIP, out_dir: str | Path) -> Path:
    """A directory that transformers takes as it is: `config.json` + `model.safetensors` for
    `CLIPModel.from_pretrained`, and the image processor and tokenizer files (`hf_processor.py`) for
    `CLIPProcessor.from_pretrained` and `pipeline("zero-shot-image-classification", model=DIR)`."""
    _require_clip(model, "hf")
    out = convert_hf.write_hf_dir(model.config, _plain_state(model), Path(out_dir))
    write_processor_files(model.config, out)
    return out


def export_open_clip(model: CLIP, out_path: str | Path) -> Path:
    """An open_clip state dict plus `open_clip_config.json` beside it; returns the weights file.

    A path ending in .pt/.pth/.bin/.safetensors is the weights file itself (for
    `open_clip.create_model(name, pretrained=path)`); any other path is a directory laid out like an
    open_clip hub repo (`open_clip_model.safetensors`), which `open_clip.create_model("local-dir:DIR")` reads.
    """
    _require_clip(model, "open_clip")
    out = Path(out_path)
    weights = out if out.suffix in WEIGHT_SUFFIXES else out / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = convert_open_clip.to_open_clip(_plain_state(model))
    if weights.suffix == ".safetensors":
        save_weights(state, weights)
    else:
        atomic_write(weights, lambda tmp: torch.save(state, tmp))
    save_json({"model_cfg": model.config.to_open_clip_dict()}, weights.parent / OPEN_CLIP_CONFIG_NAME)
    return weights


def export(model: nn.Module, to: str, out: str | Path) -> Path:
    """Write `model` in format `to` (hf, open_clip, clip_pacl); what `clip-pacl convert` calls."""
    check_not_quantized(model, "export")
    if to == "hf":
        return export_hf(model, out)
    if to == "open_clip":
        return export_open_clip(model, out)
    if to == "clip_pacl":
        return save(model, out)
    raise ValueError(f"unknown format '{to}' (known: {', '.join(FORMATS)})")


def _require_clip(model: nn.Module, to: str) -> None:
    if not isinstance(model, CLIP):
        raise CheckpointError(f"only CLIP models can be exported to {to}; this is a {type(model).__name__} "
                              "(save it with --to clip_pacl)")
