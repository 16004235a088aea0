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
from clip_pacl.data.batch import FeatureBatch, TokenBatch
from clip_pacl.errors import ConfigError, DataError
from clip_pacl.losses import get_objective
from clip_pacl.models.clip import CLIP
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.train.config import TrainConfig, pacl_flag


def build_model(config: TrainConfig) -> tuple[nn.Module, TrainConfig]:
    """The model to train: a preset / open_clip JSON (random init) or a checkpoint (fine-tuning), and `config` with
    its objective named (the model's own, `model.objectives[0]`, when the user gave none).

    The model declares the objectives it trains under (`objectives`); another is a ConfigError that names them,
    except that `--objective pacl` on a CLIP builds a new PACL on it.
    A freshly initialised model takes the objective's initial temperature (SigLIP: ln 10); an
    objective with a learned bias gets one (SigLIP: -10) when the model has none. The new PACL is
    `PACLConfig(**config.pacl)` (frozen CLIP + trainable embedders); a PACL checkpoint takes the PACL options the
    user gave (`config.pacl`) in place of its own.
    """
    model, source = load_with_source(config.model, random_weights=True)  # a preset: training from scratch
    fresh = source.format in RANDOM_FORMATS
    if config.objective == "pacl" and isinstance(model, CLIP):
        model = PACL(model, PACLConfig(**config.pacl))  # a new PACL on this CLIP
    accepted = getattr(model, "objectives", ())
    if not accepted:
        raise ConfigError(f"{config.model} is not a trainable model ({type(model).__name__} declares no objectives)")
    if config.objective is not None and config.objective not in accepted:
        raise ConfigError(f"{config.model} is a {type(model).__name__} model: it trains under --objective "
                          f"{' or '.join(accepted)}, not {config.objective} (without --objective: {accepted[0]})")
    config = replace(config, objective=config.objective or accepted[0])  # re-checks the options against it
    if isinstance(model, PACL):
        return with_pacl_options(model, config.pacl), config
    objective = get_objective(config.objective)
    if fresh and objective.init_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(objective.init_logit_scale)
    if objective.init_logit_bias is not None and getattr(model, "logit_bias", None) is None:
        model.logit_bias = nn.Parameter(torch.tensor(float(objective.init_logit_bias)))
        model.config = replace(model.config, init_logit_bias=float(objective.init_logit_bias))
    return model, config


# What training can change in a PACL checkpoint's PACLConfig; its other fields shape or describe the trained weights.
CHANGEABLE_PACL_OPTIONS = ("unfreeze_last_n_blocks", "pool_temperature", "patch_tokens")


def with_pacl_options(model: PACL, options: dict) -> PACL:
    """A PACL checkpoint with the PACL options the user gave (`TrainConfig.pacl`) in place of its saved ones: a new
    PACL on the same CLIP with the checkpoint's weights, so the blocks to unfreeze follow the new value too. An
    option that would not fit the weights (hidden_dim, ...) is a ConfigError."""
    saved = model.config
    changed = {key: value for key, value in options.items() if value != getattr(saved, key)}
    if not changed:
        return model
    fixed = sorted(set(changed) - set(CHANGEABLE_PACL_OPTIONS))
    if fixed:
        raise ConfigError(f"{pacl_flag(fixed[0])} {changed[fixed[0]]!r} cannot change a trained PACL (it has "
                          f"{fixed[0]}={getattr(saved, fixed[0])!r}); drop it or start from its CLIP")
    new = PACL(model.clip, replace(saved, **changed))
    new.load_state_dict(model.state_dict())
    return new


class FeatureModel(nn.Module):
    """`forward(image side, text side)` -> (image side, text side, logit_scale, logit_bias): the model's
    `loss_features` of a batch's `inputs`, the scale exp(logit_scale) and the bias, in the losses' order.

    DDP and torch.compile wrap `forward`; routing the loss features and the temperature through it
    makes every trainable parameter take part in the wrapped call, whatever the model type. A model trained on
    cached features is wrapped in `CachedFeatureModel` first, whose `loss_features` takes them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_input: torch.Tensor, text_input: torch.Tensor):
        image_side, text_side = self.model.loss_features(image_input, text_input)
        return image_side, text_side, self.model.logit_scale.exp(), self.model.logit_bias


def batch_inputs(model: nn.Module, batch: TokenBatch | FeatureBatch, multiple: int = 1) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """A host batch's (image side, text side) for `FeatureModel`: a `TokenBatch`'s token ids cut as `model` allows
    (`trim_text_padding`: a CLIP's, or a PACL's on one, after the longest caption, exact; COCO-length captions need
    about 20 of 77 positions, so the text tower does ~3.5x less work). With `--compile` the length is rounded up to
    a multiple of 16, so a compiled model sees at most 5 text lengths instead of recompiling for each new one. A
    `FeatureBatch` (cached features) passes as it is."""
    if isinstance(batch, TokenBatch):
        return batch.images, model.trim_text_padding(batch.texts, multiple)
    return batch.inputs


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
