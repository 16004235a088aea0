"""An objective = how a batch of (image side, text side) pairs is scored + which loss turns scores into a number.

The training loop only knows this interface, so CLIP, SigLIP and PACL share accumulation and
distributed gathering: the image side and text side are batched along dim 0 (any trailing shape,
e.g. PACL's patch tokens), gathered across ranks with their gradients, scored pairwise by
`pair_logits`, and reduced by a softmax (InfoNCE) or sigmoid (SigLIP) loss with hard targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from clip_pacl.losses.clip import softmax_contrastive_loss
from clip_pacl.losses.distributed import gather_with_grad
from clip_pacl.losses.siglip import sigmoid_pair_loss

# (image_side (Bi, ...), text_side (Bt, ...), logit_scale (the scale, not its log), logit_bias | None) -> (Bi, Bt)
PairLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A training objective: how one rank's pairs are scored against every rank's (`pair_logits`), whether
    the loss is a softmax (InfoNCE) or a sigmoid (SigLIP), and the logit scale and bias a model starts with for it."""

    name: str
    pair_logits: PairLogits
    kind: str = "softmax"  # "softmax": symmetric InfoNCE; "sigmoid": SigLIP
    init_logit_scale: float | None = None  # the model's initial log-space parameter when training with this objective
    init_logit_bias: float | None = None  # a learned bias is created when this is not None

    def __post_init__(self) -> None:
        if self.kind not in ("softmax", "sigmoid"):
            raise ValueError(f"objective kind must be 'softmax' or 'sigmoid', not '{self.kind}'")

    def loss(
        self, image_side: torch.Tensor, text_side: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None, *, local_loss: bool = False, capacity: int | None = None, group=None,
    ) -> torch.Tensor:
        """Loss of b matching pairs on this process, contrasted against the pairs of every process. `logit_scale` is
        the scale itself (`model.logit_scale.exp()`, what a model's `forward` returns), not the log-space parameter.

        One process: the plain loss of the batch. Several: features are gathered with their gradients, each
        rank's block padded to `capacity` rows (its batch size; see `gather_with_grad`) and the padding masked
        out; `local_loss` scores only this rank's rows against everything (b x G instead of G x G logits, the
        same gradient after DDP's averaging).
        """
        images = gather_with_grad(image_side, capacity, group)
        texts = gather_with_grad(text_side, capacity, group)
        offset = images.offset if local_loss else 0
        row_valid = None if local_loss else images.valid  # local rows are all real
        rows_images = image_side if local_loss else images.rows
        logits_per_image = self.pair_logits(rows_images, texts.rows, logit_scale, logit_bias)  # (b or G, G)
        if self.kind == "sigmoid":
            return sigmoid_pair_loss(logits_per_image, offset, images.valid, row_valid)
        if local_loss:
            logits_per_text = self.pair_logits(images.rows, text_side, logit_scale, logit_bias).T  # (b, G)
        else:
            logits_per_text = logits_per_image.T
        return softmax_contrastive_loss(logits_per_image, logits_per_text, offset, images.valid, row_valid)
