"""Learning rate (and, for one-cycle, AdamW's beta1) as a pure function of the optimiser step.

cosine    linear warmup to the peak, then cosine decay to zero (open_clip's `cosine_lr`)
onecycle  PyTorch's `OneCycleLR` with its defaults: cosine warmup from lr/25 over the warmup steps, cosine decay to
          lr/250,000, and beta1 cycled the other way (beta1 + 0.05 -> beta1 - 0.05 at the peak -> beta1 + 0.05)
"""

from __future__ import annotations

import math

import torch

# The default warmup: a short run warms up over 30% of its steps (PyTorch's OneCycleLR, the plain loop that learned
# best in benchmarks/recipes.py, where a 50-step warmup of a 400-step run trailed it); a long run stops at open_clip's
# 10,000 steps (its script's default, used for its LAION runs).
WARMUP_FRACTION, WARMUP_MAX = 0.3, 10_000


def default_warmup(total: int) -> int:
    """Warmup steps when --warmup is not given: 30% of `total`, rounded up, at most 10,000."""
    return min(math.ceil(WARMUP_FRACTION * total), WARMUP_MAX)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimiser step `step` (0-based), as open_clip's `cosine_lr`.

    Warmup reaches `base_lr` at step `warmup - 1`; the cosine runs over the remaining steps.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


SCHEDULES = ("cosine", "onecycle")
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_BETA1_SWING = 25.0, 1e4, 0.05  # OneCycleLR's defaults (momentum 0.85-0.95)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def onecycle_at(step: int, base_lr: float, warmup: int, total: int, beta1: float) -> tuple[float, float]:
    """(lr, beta1) for optimiser step `step` (0-based), equal to `torch.optim.lr_scheduler.OneCycleLR(max_lr=base_lr,
    total_steps=total, pct_start=warmup / total, base_momentum=beta1 - 0.05, max_momentum=beta1 + 0.05)`."""
    low, high = max(beta1 - ONECYCLE_BETA1_SWING, 0.0), min(beta1 + ONECYCLE_BETA1_SWING, 0.999)
    initial = base_lr / ONECYCLE_DIV
    peak_step = float(warmup) - 1
    if step <= peak_step:
        pct = step / peak_step if peak_step > 0 else 1.0
        return _cos_anneal(initial, base_lr, pct), _cos_anneal(high, low, pct)
    start = max(peak_step, 0.0)
    pct = min(1.0, (step - start) / max(total - 1 - start, 1.0))
    return _cos_anneal(base_lr, initial / ONECYCLE_FINAL_DIV, pct), _cos_anneal(low, high, pct)


class StepSchedule:
    """Either schedule (`kind`: "cosine" or "onecycle") applied to an optimiser: sets each param group's lr (and for
    one-cycle beta1) from the step; its whole state is the step, saved with checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup: int, total: int,
                 kind: str = "cosine"):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}")
        self.optimizer, self.base_lr, self.warmup, self.total, self.kind = optimizer, base_lr, warmup, total, kind
        self.beta1 = optimizer.param_groups[0]["betas"][0] if optimizer.param_groups else 0.9
        self.step_num = 0

    def apply(self, step: int) -> float:
        """Set the lr (one-cycle: and beta1) for optimiser step `step` and return the lr."""
        self.step_num = step
        if self.kind == "onecycle":
            lr, beta1 = onecycle_at(step, self.base_lr, self.warmup, self.total, self.beta1)
            for group in self.optimizer.param_groups:
                group["betas"] = (beta1, group["betas"][1])
        else:
            lr = lr_at(step, self.base_lr, self.warmup, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float | int | str]:
        return {"step": self.step_num, "base_lr": self.base_lr, "warmup": self.warmup, "total": self.total,
                "kind": self.kind}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.step_num = int(state["step"])
