"""Gathering features across processes with their gradients, for a contrastive batch that spans all ranks.

Why a custom autograd function: every rank computes a loss that depends on every rank's features,
so rank k's features must receive the gradient from every rank's loss. The backward all-reduces
(sums) the gathered gradient and keeps this rank's rows; DDP then averages parameter gradients, and
the result equals the single-process gradient of the same global batch (tested). all_reduce works
on every backend (gloo has no reduce_scatter, which `torch.distributed.nn.all_gather` may use).
Ranks may hold different numbers of rows (a batch that lost unreadable images): rows are padded
to the largest count for the collective and the padding is dropped again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _row_counts(x: torch.Tensor, group) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), group=group)
    return [int(c.item()) for c in counts]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        rows = max(counts)
        padded = x.new_zeros((rows, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])  # (sum(counts), ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's (b_r, ...) tensor along dim 0 -> ((sum b_r, ...), offset of this rank's rows).

    Without a process group (one process) it returns `x` and 0.
    """
    if not is_distributed():
        return x, 0
    counts = _row_counts(x, group)
    return _GatherWithGrad.apply(x, counts, group), sum(counts[: dist.get_rank(group)])
