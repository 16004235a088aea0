"""Hugging Face `transformers` CLIPModel checkpoints <-> ours: a rename table plus three reshapes.

The reshapes: HF keeps separate q/k/v projections where we (like OpenAI) pack them into one
`in_proj`; HF's projections are `nn.Linear` weights, i.e. the transpose of our `proj` matrices;
HF stores the class embedding and positions under `embeddings.`. HF CLIP has no ResNet tower and
no SigLIP bias, so those models cannot be exported to it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from clip_pacl.checkpoint.files import read_weights, save_json, save_weights
from clip_pacl.config import CLIPConfig, TextConfig, VisionConfig, config_float, config_int
from clip_pacl.errors import CheckpointError, ConfigError

# ours -> HF, for keys outside the transformer blocks. `visual.proj` and `text.text_projection` are transposed.
TOP_LEVEL = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.text_projection": "text_projection.weight",
}
TRANSPOSED = ("visual.proj", "text.text_projection")
# ours -> HF inside one transformer block (the packed in_proj is split into q/k/v separately).
BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
TOWERS = {
    "visual.transformer.resblocks": "vision_model.encoder.layers",
    "text.transformer.resblocks": "text_model.encoder.layers",
}
# Buffers HF checkpoints carry that are not weights.
HF_DROPPED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that omit them.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "eos_token_id", "image_size", "patch_size")


def is_hf_config(data: dict[str, Any]) -> bool:
    """HF's CLIP config.json (as opposed to ours, which also says `model_type: clip`) nests tower configs."""
    return "text_config" in data or "vision_config" in data


def config_from_hf(data: dict[str, Any], source: str = "config.json") -> CLIPConfig:
    """Our config for an HF CLIP config dict; refuses settings our towers do not compute, and values of the
    wrong type or out of range (one ConfigError line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a JSON object")
    towers = {}
    for key, defaults in (("text_config", _TEXT_DEFAULTS), ("vision_config", _VISION_DEFAULTS)):
        given = data.get(key) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: {key} must be an object, not {type(given).__name__}")
        towers[key] = {**defaults, **given}
        for name in _INT_FIELDS:
            if name in towers[key]:
                towers[key][name] = config_int(towers[key][name], f"{source}: {key}.{name}")
    text, vision = towers["text_config"], towers["vision_config"]
    if data.get("model_type", "clip") != "clip":
        raise CheckpointError(f"{source} is a '{data.get('model_type')}' model; only HF CLIPModel checkpoints are read")
    acts = {text["hidden_act"], vision["hidden_act"]}
    if not all(isinstance(a, str) for a in acts) or len(acts) != 1 or not acts <= _ACTIVATIONS.keys():
        raise CheckpointError(f"{source} uses hidden_act {sorted(acts)}; supported: quick_gelu or gelu in both towers")
    for tower, cfg in (("text", text), ("vision", vision)):
        if not isinstance(cfg["layer_norm_eps"], (int, float)) or not math.isclose(float(cfg["layer_norm_eps"]), 1e-5):
            raise CheckpointError(f"{source}: {tower} layer_norm_eps={cfg['layer_norm_eps']} is unsupported "
                                  "(only 1e-5)")
    # We pool at the highest token id (argmax), as OpenAI did; HF does the same when eos_token_id is the legacy 2,
    # and otherwise pools at the first eos_token_id, which is the same position only when eos is the top id.
    eos = text["eos_token_id"]
    if eos not in (2, text["vocab_size"] - 1):
        raise CheckpointError(f"{source}: eos_token_id={eos} is unsupported (the end-of-text token must be the "
                              f"highest id, {text['vocab_size'] - 1})")
    v_width, t_width = vision["hidden_size"], text["hidden_size"]
    if vision["num_attention_heads"] < 1 or v_width % vision["num_attention_heads"]:
        raise ConfigError(f"{source}: vision_config.hidden_size {v_width} is not divisible by num_attention_heads "
                          f"{vision['num_attention_heads']}")
    return CLIPConfig(
        embed_dim=config_int(data.get("projection_dim", 512), f"{source}: projection_dim"),
        vision=VisionConfig(image_size=vision["image_size"], layers=vision["num_hidden_layers"], width=v_width,
                            head_width=v_width // vision["num_attention_heads"],
                            mlp_ratio=vision["intermediate_size"] / max(v_width, 1), patch_size=vision["patch_size"]),
        text=TextConfig(context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"],
                        width=t_width, heads=text["num_attention_heads"], layers=text["num_hidden_layers"],
                        mlp_ratio=text["intermediate_size"] / max(t_width, 1)),
        quick_gelu=_ACTIVATIONS[text["hidden_act"]],
        init_logit_scale=config_float(data.get("logit_scale_init_value", math.log(1 / 0.07)),
                                      f"{source}: logit_scale_init_value"),
        name=str(data.get("_name_or_path") or "") or None,
    )


def config_to_hf(config: CLIPConfig) -> dict[str, Any]:
    """An HF CLIPConfig dict, every value explicit so any transformers version reads the same model."""
    _check_exportable(config)
    v, t = config.vision, config.text
    act = "quick_gelu" if config.quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "text_config": {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": config.embed_dim,
                        "bos_token_id": t.vocab_size - 2, "eos_token_id": t.vocab_size - 1, "pad_token_id": 1},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.width,
                          "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5,
                          "projection_dim": config.embed_dim},
    }


def _check_exportable(config: CLIPConfig) -> None:
    if config.vision.is_resnet:
        raise CheckpointError("Hugging Face CLIPModel has no ResNet image tower; export a ViT model, or use open_clip")
    if config.init_logit_bias is not None:
        raise CheckpointError("Hugging Face CLIPModel has no logit bias (a SigLIP model); export to open_clip instead")


def _block_keys(config: CLIPConfig):
    """(our prefix, HF prefix, width) for every transformer block of both towers."""
    for ours, hf in TOWERS.items():
        tower = config.vision if ours.startswith("visual") else config.text
        for i in range(tower.layers):
            yield f"{ours}.{i}.", f"{hf}.{i}.", tower.width


def state_from_hf(hf: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """HF CLIPModel tensors -> our state dict for `config`."""
    hf = {k: v for k, v in hf.items() if k not in HF_DROPPED}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"the HF checkpoint lacks '{key}'")
        used.add(key)
        return hf[key]

    for ours, name in TOP_LEVEL.items():
        out[ours] = take(name).T.contiguous() if ours in TRANSPOSED else take(name)
    for ours_prefix, hf_prefix, _ in _block_keys(config):
        for ours, name in BLOCK.items():
            out[ours_prefix + ours] = take(hf_prefix + name)
        for part in ("weight", "bias"):
            qkv = [take(f"{hf_prefix}self_attn.{p}_proj.{part}") for p in ("q", "k", "v")]
            out[f"{ours_prefix}attn.in_proj_{part}"] = torch.cat(qkv, dim=0)
    unused = sorted(set(hf) - used)
    if unused:
        raise CheckpointError(f"the HF checkpoint has {len(unused)} tensors this CLIP does not use (e.g. {unused[0]})")
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF CLIPModel tensors (the inverse of `state_from_hf`)."""
    _check_exportable(config)
    out = {name: (state[ours].T if ours in TRANSPOSED else state[ours]).contiguous()
           for ours, name in TOP_LEVEL.items()}
    for ours_prefix, hf_prefix, width in _block_keys(config):
        for ours, name in BLOCK.items():
            out[hf_prefix + name] = state[ours_prefix + ours]
        for part in ("weight", "bias"):
            q, k, v = state[f"{ours_prefix}attn.in_proj_{part}"].split(width, dim=0)
            for p, tensor in zip("qkv", (q, k, v)):
                out[f"{hf_prefix}self_attn.{p}_proj.{part}"] = tensor.contiguous()
    return out


def read_hf_dir(path: Path, meta: bool = False) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """Config and our state dict from an HF CLIP directory (`config.json` + safetensors or a `.bin`);
    `meta`: the state dict's tensors on the meta device, as the file declares them (no data read)."""
    data = json.loads((path / "config.json").read_text())
    config = config_from_hf(data, str(path / "config.json"))
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has an HF config.json but no model.safetensors or pytorch_model.bin")
    return config, state_from_hf(read_weights(weights, meta=meta), config)


def write_hf_dir(config: CLIPConfig, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers.CLIPModel.from_pretrained` loads."""
    hf_config = config_to_hf(config)
    hf_state = state_to_hf(state, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(hf_state, out_dir / "model.safetensors")
    save_json(hf_config, out_dir / "config.json")
    return out_dir
