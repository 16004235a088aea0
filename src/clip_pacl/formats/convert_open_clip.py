"""open_clip (and OpenAI) state dicts <-> ours, and the architecture read back from tensor shapes.

Our keys are open_clip's except that the text tower lives under `text.` (open_clip keeps it at the
top level, as OpenAI did) and there is no `attn_mask` buffer. A bare state dict does not say how
many attention heads it was trained with or which activation it used, so those follow OpenAI's
conventions (64-wide heads, QuickGELU) unless a preset with exactly these shapes says otherwise or
the caller passes a config.
"""

from __future__ import annotations

import re
from dataclasses import asdict, replace

import torch

from clip_pacl.config import CLIPConfig, TextConfig, VisionConfig, available_presets
from clip_pacl.errors import CheckpointError

# Top-level keys of open_clip's text tower; everything else under the top level is `visual.*` or a logit.
_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Entries that are not weights: OpenAI's TorchScript metadata, open_clip's (old, persistent) causal mask.
_DROPPED = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip / OpenAI keys -> ours: the text tower moves under `text.`; metadata entries are dropped."""
    out = {}
    for key, value in state.items():
        if key in _DROPPED:
            continue
        out[f"text.{key}" if key.startswith(_TEXT_TOP_LEVEL) else key] = value
    return out


def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> open_clip keys (what `open_clip.create_model(...).load_state_dict` accepts)."""
    return {key.removeprefix("text."): value for key, value in state.items()}


def is_open_clip_state(state: dict[str, torch.Tensor]) -> bool:
    """open_clip/OpenAI layout (text tower at the top level) as opposed to ours (`text.` prefix)."""
    return "token_embedding.weight" in state and "visual.conv1.weight" in state


def is_our_state(state: dict[str, torch.Tensor]) -> bool:
    return "text.token_embedding.weight" in state and "visual.conv1.weight" in state


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_config(state: dict[str, torch.Tensor], quick_gelu: bool | None = None, name: str | None = None) -> CLIPConfig:
    """The architecture of an open_clip/OpenAI-layout state dict, read from its tensor shapes.

    This follows OpenAI's `build_model` (heads = width / 64); when the shapes match one of our presets
    exactly, that preset's head counts are used instead, since heads are invisible in the weights.
    """
    try:
        vision = _infer_vision(state)
        tok = state["token_embedding.weight"]  # (vocab, width)
        pos = state["positional_embedding"]  # (context, width)
        text_width = tok.shape[1]
        text_layers = _count_blocks(state, "transformer.resblocks.")
        text_hidden = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = state["text_projection"].shape[1]
        text = TextConfig(context_length=pos.shape[0], vocab_size=tok.shape[0], width=text_width,
                          heads=_heads(text_width), layers=text_layers, mlp_ratio=text_hidden / text_width)
    except (ValueError, IndexError, TypeError, ZeroDivisionError):  # shapes no CLIP has (too few dims, zero sizes)
        raise CheckpointError("the state dict's tensor shapes are not an open_clip/OpenAI CLIP's") from None
    except KeyError as e:
        raise CheckpointError(f"the state dict lacks {e} and is not an open_clip/OpenAI CLIP") from None
    config = CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu is not False, name=name)
    if "logit_bias" in state:  # a meta tensor (a file's declared tensors) has no value: the load sets it later
        bias = state["logit_bias"]
        config = replace(config, init_logit_bias=0.0 if bias.is_meta or bias.numel() != 1 else float(bias))
    return _with_preset_heads(config)


def _heads(width: int) -> int:
    """OpenAI's convention, 64-wide heads; one head for narrower (test-sized) widths."""
    return max(width // 64, 1)


def _infer_vision(state: dict[str, torch.Tensor]) -> VisionConfig:
    if "visual.proj" in state:  # ViT
        width, _, patch, _ = state["visual.conv1.weight"].shape  # (width, 3, p, p)
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        hidden = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        return VisionConfig(image_size=grid * patch, layers=_count_blocks(state, "visual.transformer.resblocks."),
                            width=width, head_width=width // _heads(width), mlp_ratio=hidden / width, patch_size=patch)
    if "visual.attnpool.positional_embedding" in state:  # ModifiedResNet
        width = state["visual.conv1.weight"].shape[0] * 2  # the stem's first conv has width / 2 channels
        layers = tuple(_count_blocks(state, f"visual.layer{i}.") for i in range(1, 5))
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return VisionConfig(image_size=grid * 32, layers=layers, width=width, head_width=64)
    raise KeyError("visual.proj")


def _with_preset_heads(config: CLIPConfig) -> CLIPConfig:
    for preset in available_presets():
        p = CLIPConfig.from_name(preset)
        if _shapes(config) == _shapes(p):
            return replace(config, vision=replace(config.vision, head_width=p.vision.head_width),
                           text=replace(config.text, heads=p.text.heads))
    return config


def _shapes(config: CLIPConfig) -> tuple:
    """What the weights show of an architecture: all but the head counts."""
    return ({**asdict(config.vision), "head_width": None}, {**asdict(config.text), "heads": None}, config.embed_dim)
