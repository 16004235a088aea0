"""Building what a run needs from its TrainConfig: the model (with its objective's temperature/bias) and data.

Everything here runs before the first step, so configuration mistakes (unknown preset, missing
column, a dataset smaller than one batch) fail before any work starts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from clip_pacl.checkpoint.io import RANDOM_FORMATS, load_with_source
from clip_pacl.errors import ConfigError, DataError
from clip_pacl.losses import Objective
from clip_pacl.models.pacl import PACL
from clip_pacl.models.text import TextTransformer
from clip_pacl.train.config import TrainConfig, train_defaults


def build_model(config: TrainConfig, objective: Objective) -> nn.Module:
    """The model to train: a preset / open_clip JSON (random init) or a checkpoint (fine-tuning).

    A freshly initialised model takes the objective's initial temperature (SigLIP: ln 10); an
    objective with a learned bias gets one (SigLIP: -10) when the model has none. `--objective pacl`
    wraps the CLIP in a PACL model (frozen CLIP + trainable embedders).
    """
    model, source = load_with_source(config.model, random_weights=True)  # a preset: training from scratch
    fresh = source.format in RANDOM_FORMATS
    if objective.name == "pacl":
        from clip_pacl.models.pacl import PACL, PACLConfig

        if isinstance(model, PACL):
            _check_no_pacl_flags(config, model.config)
            return model
        return PACL(model, PACLConfig(unfreeze_last_n_blocks=config.pacl_unfreeze_blocks,
                                      pool_temperature=config.pacl_pool_temperature,
                                      patch_tokens=config.pacl_patch_tokens))
    if not hasattr(model, "loss_features"):
        raise ConfigError(f"{config.model} is not a trainable model (no loss_features)")
    if fresh and objective.init_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(objective.init_logit_scale)
    if objective.init_logit_bias is not None and getattr(model, "logit_bias", None) is None:
        model.logit_bias = nn.Parameter(torch.tensor(float(objective.init_logit_bias)))
        model.config = replace(model.config, init_logit_bias=float(objective.init_logit_bias))
    return model


def _check_no_pacl_flags(config: TrainConfig, saved) -> None:
    """A PACL checkpoint brings its own PACLConfig: a --pacl-* flag asking for another value would be ignored."""
    defaults = train_defaults()
    for flag, key in (("pacl_unfreeze_blocks", "unfreeze_last_n_blocks"), ("pacl_pool_temperature", "pool_temperature"),
                      ("pacl_patch_tokens", "patch_tokens")):
        value = getattr(config, flag)
        if value != defaults[flag] and value != getattr(saved, key):
            raise ConfigError(f"--{flag.replace('_', '-')} {value} cannot change {config.model}, already a PACL model "
                              f"with {key}={getattr(saved, key)!r}; drop the flag (or start from its CLIP)")


class FeatureModel(nn.Module):
    """`forward(images, texts)` -> (image side, text side, logit_scale, logit_bias).

    DDP and torch.compile wrap `forward`; routing the loss features and the temperature through it
    makes every trainable parameter take part in the wrapped call, whatever the model type.
    `from_cache`: the batches are precomputed CLIP features (`--cache-features`, PACL only).
    """

    def __init__(self, model: nn.Module, from_cache: bool = False):
        super().__init__()
        self.model = model
        self.from_cache = from_cache

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        features = self.model.loss_features_from_cache if self.from_cache else self.model.loss_features
        image_side, text_side = features(images, texts)
        return image_side, text_side, self.model.logit_scale, getattr(self.model, "logit_bias", None)


def trim_text_padding(model: nn.Module, texts: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """A host batch of token ids (B, 77) cut after its longest caption when `model` (a CLIP, or a PACL on one) has
    clip-pacl's text tower (`TextTransformer.trim_padding`: exact); COCO-length captions need about 20 positions, so
    the text tower does ~3.5x less work. Other models' ids and cached text features pass unchanged. With
    `--compile` the length is rounded up to a multiple of 16, so a compiled model sees at most 5 text lengths
    instead of recompiling for each new one."""
    clip = model.clip if isinstance(model, PACL) else model
    if texts.is_floating_point() or not isinstance(getattr(clip, "text", None), TextTransformer):
        return texts
    return TextTransformer.trim_padding(texts, multiple)


def build_datasets(config: TrainConfig, model: nn.Module, image_size: int) -> tuple[Dataset, list | None]:
    """(training dataset, validation rows or None). Validation rows feed `evaluate_retrieval`.

    The tokenizer and transforms are the model's own (CLIP BPE for CLIP/PACL, the backbone's for a
    backbone model).
    """
    from clip_pacl.data import build_caption_dataset, read_caption_rows
    from clip_pacl.data.formats import is_wds_pattern
    from clip_pacl.preprocess import model_tokenizer, model_transform

    if not Path(config.data).exists() and not is_wds_pattern(config.data):  # shard patterns are checked per shard
        raise DataError(f"--data {config.data} does not exist")
    keys = {"data_format": config.data_format, "image_key": config.image_key, "caption_key": config.caption_key,
            "images_dir": config.images_dir}
    train_ds, val_ds = build_caption_dataset(
        config.data, transform=model_transform(model, train=config.augment, image_size=image_size),
        tokenizer=model_tokenizer(model), val_fraction=config.val_fraction, seed=config.seed,
        val_transform=model_transform(model, image_size=image_size), **keys,
    )
    val_rows = list(val_ds.rows) if val_ds is not None else None
    if config.val_data is not None:
        if not Path(config.val_data).exists():
            raise DataError(f"--val-data {config.val_data} does not exist")
        val_rows = read_caption_rows(config.val_data, **{**keys, "images_dir": None})
    if len(train_ds) == 0:
        raise DataError(f"{config.data} has no training pairs")
    return train_ds, val_rows
