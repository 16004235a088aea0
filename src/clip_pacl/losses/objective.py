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

# (image_side (Bi, ...), text_side (Bt, ...), logit_scale (log-space), logit_bias | None) -> logits (Bi, Bt)
PairLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    name: str
    pair_logits: PairLogits
    kind: str = "softmax"  # "softmax": symmetric InfoNCE; "sigmoid": SigLIP
    init_logit_scale: float | None = None  # the model's initial log-scale when training with this objective
    init_logit_bias: float | None = None  # a learned bias is created when this is not None

    def __post_init__(self) -> None:
        if self.kind not in ("softmax", "sigmoid"):
            raise ValueError(f"objective kind must be 'softmax' or 'sigmoid', not '{self.kind}'")

    def loss(
        self, image_side: torch.Tensor, text_side: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None, *, local_loss: bool = False, group=None,
    ) -> torch.Tensor:
        """Loss of b matching pairs on this process, contrasted against the pairs of every process.

        One process: the plain loss of the batch. Several: features are gathered with their gradients;
        `local_loss` scores only this rank's rows against everything (b x G instead of G x G logits,
        the same gradient after DDP's averaging).
        """
        all_images, offset = gather_with_grad(image_side, group)
        all_texts, _ = gather_with_grad(text_side, group)
        if not local_loss:
            offset = 0
        rows_images = image_side if local_loss else all_images
        logits_per_image = self.pair_logits(rows_images, all_texts, logit_scale, logit_bias)  # (b or G, G)
        if self.kind == "sigmoid":
            return sigmoid_pair_loss(logits_per_image, offset)
        if local_loss:
            logits_per_text = self.pair_logits(all_images, text_side, logit_scale, logit_bias).T  # (b, G)
        else:
            logits_per_text = logits_per_image.T
        return softmax_contrastive_loss(logits_per_image, logits_per_text, offset)
