"""PyTorch Lightning wrappers: train any clip-pacl model (CLIP, PACL, backbone) with a Lightning Trainer.

For people whose infrastructure is Lightning (loggers, callbacks, multi-node launchers). The model,
the objectives, the optimiser groups, the temperature clamp and the learning-rate schedule are the
same pieces `clip-pacl train` uses, so both paths train the same way; `clip-pacl train` stays the
reference loop. Needs the `[lightning]` extra.

    import lightning as L
    module = CLIPLightningModule(clip_pacl.load("tiny"), objective="clip", lr=5e-4)
    data = CaptionDataModule("data/captions.csv", image_size=64, batch_size=64, val_fraction=0.1)
    L.Trainer(max_steps=1000).fit(module, data)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_pacl.errors import MissingDependencyError

try:
    import lightning as L
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("lightning", "lightning", "the Lightning integration") from None

from clip_pacl.data import build_caption_dataset, build_loader
from clip_pacl.losses import get_objective
from clip_pacl.train.optim import build_optimizer, clamp_logit_scale
from clip_pacl.train.schedule import lr_at


class CLIPLightningModule(L.LightningModule):
    """Contrastive training of `model` (anything with `loss_features`, `logit_scale`, `logit_bias`).

    Batches are `collate_skip_bad` dicts; unreadable images are already dropped and counted there,
    and a batch with no readable image is skipped. Under DDP the objective gathers features from
    every rank with their gradients, so the contrastive batch is the global batch, as in CLIP.
    """

    def __init__(self, model: nn.Module, *, objective: str = "clip", lr: float = 5e-4, weight_decay: float = 0.2,
                 warmup_steps: int = 0, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6):
        super().__init__()
        self.model = model
        self.objective = get_objective(objective)
        self.lr, self.weight_decay, self.warmup_steps, self.betas, self.eps = lr, weight_decay, warmup_steps, betas, eps
        self.save_hyperparameters(ignore=["model"])

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """The objective's loss on one batch of matching (image, text) pairs."""
        image_side, text_side = self.model.loss_features(images, texts)
        return self.objective.loss(image_side, text_side, self.model.logit_scale,
                                   getattr(self.model, "logit_bias", None))

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        if batch["images"].shape[0] == 0:
            return None
        loss = self(batch["images"], batch["texts"])
        size = batch["images"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=size, sync_dist=stage != "train")
        self.log(f"{stage}/bad_images", float(batch["n_bad"]), reduce_fx="sum", batch_size=size)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "val")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        clamp_logit_scale(self.model)  # after the optimiser step, as CLIP does

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.lr, self.weight_decay, self.betas, self.eps)
        estimated = self.trainer.estimated_stepping_batches  # inf when the run has no step or epoch limit
        total = max(int(estimated), 1) if math.isfinite(estimated) else None
        warmup = self.warmup_steps

        def factor(step: int) -> float:  # warmup then cosine to zero; warmup then constant without a known end
            if total is None:
                return min(1.0, (step + 1) / warmup) if warmup else 1.0
            return lr_at(step, 1.0, warmup, total)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CaptionDataModule(L.LightningDataModule):
    """Any caption data `clip-pacl train --data` reads, with the model's preprocessing.

    `transform` / `val_transform` / `tokenizer` default to clip-pacl's CLIP transforms and BPE tokenizer;
    pass a backbone model's `image_transform(True)`, `image_transform(False)` and `get_tokenizer()` for it.
    """

    def __init__(self, data: str | Path, *, image_size: int = 224, batch_size: int = 64, workers: int = 0,
                 val_fraction: float = 0.0, seed: int = 0, data_format: str | None = None,
                 image_key: str = "image", caption_key: str = "caption", context_length: int = 77,
                 transform=None, val_transform=None, tokenizer=None):
        super().__init__()
        self.data, self.batch_size, self.workers, self.seed = data, batch_size, workers, seed
        self.val_fraction, self.keys = val_fraction, {"data_format": data_format, "image_key": image_key,
                                                      "caption_key": caption_key}
        if transform is None or val_transform is None or tokenizer is None:
            from clip_pacl.tokenizer import get_tokenizer
            from clip_pacl.transforms import image_transform

            transform = transform or image_transform(image_size, train=True)
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
