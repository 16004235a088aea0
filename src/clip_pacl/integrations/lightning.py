"""PyTorch Lightning wrappers: train any clip-pacl model (CLIP, PACL, backbone) with a Lightning Trainer.

For people whose infrastructure is Lightning (loggers, callbacks, multi-node launchers). The model,
the objectives, the optimiser groups, the temperature clamp and the learning-rate schedule are the
same pieces `clip-pacl train` uses, with its defaults (TrainConfig's lr, weight decay and AdamW moments, the
one-cycle schedule warming up over 30% of the run, no crop augmentation), so both paths train the same way;
`clip-pacl train` stays the reference loop. Needs the `[lightning]` extra.

    import lightning as L
    module = CLIPLightningModule(clip_pacl.load("tiny", random_weights=True), objective="clip", lr=5e-4)
    data = CaptionDataModule("data/captions.csv", image_size=64, batch_size=64, val_fraction=0.1)
    L.Trainer(max_steps=1000).fit(module, data)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_pacl.errors import ConfigError, MissingDependencyError

try:
    import lightning as L
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("lightning", "lightning", "the Lightning integration") from None

from clip_pacl.data import TokenBatch, build_caption_dataset, build_loader
from clip_pacl.losses import get_objective
from clip_pacl.train.config import train_defaults
from clip_pacl.train.optim import build_optimizer, clamp_logit_scale
from clip_pacl.train.schedule import SCHEDULES, StepSchedule, default_warmup

# `clip-pacl train`'s recipe defaults, read from its config so that the two paths cannot drift apart
_TRAIN = train_defaults()


class CLIPLightningModule(L.LightningModule):
    """Contrastive training of `model` (anything with `loss_features`, `logit_scale`, `logit_bias`).

    Batches are `collate_skip_bad`'s `TokenBatch`es; unreadable images are already dropped and counted there,
    and a batch with no readable image is skipped. Under DDP the objective gathers features from
    every rank with their gradients, so the contrastive batch is the global batch, as in CLIP.
    """

    def __init__(self, model: nn.Module, *, objective: str | None = None, lr: float = _TRAIN["lr"],
                 weight_decay: float = _TRAIN["wd"], warmup_steps: int | None = _TRAIN["warmup"],
                 betas: tuple[float, float] = (_TRAIN["beta1"], _TRAIN["beta2"]), eps: float = _TRAIN["eps"],
                 schedule: str = _TRAIN["schedule"]):
        """`objective`: one the model trains under (`model.objectives`; None: its first). `warmup_steps=None`: 30% of
        the run, at most 10,000 steps (`clip-pacl train`'s default). `schedule`:
        "onecycle" or "cosine" (train/schedule.py). A run with no step or epoch limit has no end to schedule
        towards: it warms up over `warmup_steps` (0 when None) and then keeps the peak lr."""
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, not '{schedule}'")
        accepted = tuple(getattr(model, "objectives", ()))
        objective = objective or next(iter(accepted), None)
        if objective not in accepted:
            raise ConfigError(f"a {type(model).__name__} trains under objective {' or '.join(accepted) or 'none'}, "
                              f"not {objective}")
        self.model = model
        self.objective = get_objective(objective)
        self.lr, self.weight_decay, self.warmup_steps, self.betas, self.eps = lr, weight_decay, warmup_steps, betas, eps
        self.schedule_kind = schedule
        self.lr_schedule: StepSchedule | None = None  # set by configure_optimizers once the run's length is known
        self.save_hyperparameters(ignore=["model"])

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """The objective's loss on one batch of matching (image, text) pairs (the scale exp(logit_scale), as the
        losses take it)."""
        image_side, text_side = self.model.loss_features(images, texts)
        return self.objective.loss(image_side, text_side, self.model.logit_scale.exp(), self.model.logit_bias)

    def _step(self, batch: TokenBatch, stage: str) -> torch.Tensor | None:
        if len(batch) == 0:
            return None
        loss = self(*batch.inputs)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=stage != "train")
        self.log(f"{stage}/bad_images", float(batch.n_bad), reduce_fx="sum", batch_size=len(batch))
        return loss

    def training_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), batch_size=1)
        return loss

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "val")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The lr (one-cycle: and beta1) for the coming optimiser step, a pure function of the step as in
        `clip-pacl train`, so a resumed run continues its schedule."""
        step = self.trainer.global_step
        if self.lr_schedule is not None:
            self.lr_schedule.apply(step)
            return
        warmup = self.warmup_steps or 0
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.lr * min(1.0, (step + 1) / warmup) if warmup else self.lr

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        clamp_logit_scale(self.model)  # after the optimiser step, as CLIP does

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = build_optimizer(self.model, self.lr, self.weight_decay, self.betas, self.eps)
        estimated = self.trainer.estimated_stepping_batches  # inf when the run has no step or epoch limit
        if math.isfinite(estimated):
            total = max(int(estimated), 1)
            warmup = default_warmup(total) if self.warmup_steps is None else self.warmup_steps
            self.lr_schedule = StepSchedule(optimizer, self.lr, warmup, total, kind=self.schedule_kind)
        return optimizer


class CaptionDataModule(L.LightningDataModule):
    """Any caption data `clip-pacl train --data` reads, with the model's preprocessing.

    `transform` / `val_transform` / `tokenizer` default to clip-pacl's CLIP transforms and BPE tokenizer;
    pass a backbone model's `image_transform(augment)`, `image_transform(False)` and `get_tokenizer()` for it.
    `augment=True`: random resized crops (scale 0.9-1, `clip-pacl train --augment`); by default the training images
    get the evaluation transform, as in `clip-pacl train`.
    """

    def __init__(self, data: str | Path, *, image_size: int = 224, batch_size: int = 64, workers: int = 0,
                 val_fraction: float = 0.0, seed: int = 0, data_format: str | None = None, augment: bool = False,
                 image_key: str = "image", caption_key: str = "caption", context_length: int = 77,
                 transform=None, val_transform=None, tokenizer=None):
        super().__init__()
        self.data, self.batch_size, self.workers, self.seed = data, batch_size, workers, seed
        self.val_fraction, self.keys = val_fraction, {"data_format": data_format, "image_key": image_key,
                                                      "caption_key": caption_key}
        if transform is None or val_transform is None or tokenizer is None:
            from clip_pacl.tokenizer import get_tokenizer
            from clip_pacl.transforms import image_transform

            transform = transform or image_transform(image_size, train=augment)
            val_transform = val_transform or image_transform(image_size)
            tokenizer = tokenizer or get_tokenizer(context_length)
        self.transform, self.val_transform, self.tokenizer = transform, val_transform, tokenizer
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = build_caption_dataset(
                self.data, transform=self.transform, tokenizer=self.tokenizer, val_fraction=self.val_fraction,
                seed=self.seed, val_transform=self.val_transform, **self.keys)

    def train_dataloader(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return build_loader(self.train_set, batch_size=self.batch_size, shuffle=True, workers=self.workers,
                            seed=self.seed, drop_last=True, epoch=epoch)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return build_loader(self.val_set, batch_size=self.batch_size, shuffle=False, workers=self.workers,
                            seed=self.seed, drop_last=False)
