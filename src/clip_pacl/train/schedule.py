"""Learning rate: linear warmup then cosine decay to zero, a pure function of the optimiser step."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimiser step `step` (0-based), as open_clip's `cosine_lr`.

    Warmup reaches `base_lr` at step `warmup - 1`; the cosine runs over the remaining steps.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


class WarmupCosine:
    """Sets each param group's lr from the step; its whole state is the step, saved with checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup: int, total: int):
        self.optimizer, self.base_lr, self.warmup, self.total = optimizer, base_lr, warmup, total
        self.step_num = 0

    def apply(self, step: int) -> float:
        """Set the lr for optimiser step `step` and return it."""
        self.step_num = step
        lr = lr_at(step, self.base_lr, self.warmup, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float | int]:
        return {"step": self.step_num, "base_lr": self.base_lr, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.step_num = int(state["step"])
