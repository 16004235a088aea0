"""Gathering features across processes with their gradients, for a contrastive batch that spans all ranks.

Why a custom autograd function: every rank computes a loss that depends on every rank's features,
so rank k's features must receive the gradient from every rank's loss. The backward all-reduces
(sums) the gathered gradient and keeps this rank's rows; DDP then averages parameter gradients, and
the result equals the single-process gradient of the same global batch (tested). all_reduce works
on every backend (gloo has no reduce_scatter, which `torch.distributed.nn.all_gather` may use).

Ranks may hold different numbers of rows (a batch that lost unreadable images). Each rank pads its rows
to a fixed `capacity` (the per-rank batch size, known to every rank) and the gathered batch comes with a
validity mask, so no rank ever reads a row count back to the host: the losses mask padded rows and
columns out (`column_valid` / `row_valid`), and nothing in a training step waits for the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class Gathered(NamedTuple):
    """Every rank's rows, each rank's block padded to `capacity`: (W * capacity, ...) rows, a (W * capacity,) bool
    mask of the real ones (None on one process), and where this rank's block starts."""

    rows: torch.Tensor
    valid: torch.Tensor | None
    offset: int


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, capacity: int, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.rows, ctx.start = group, x.shape[0], dist.get_rank(group) * capacity
        padded = x.new_zeros((capacity, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, padded, group=group)
        return torch.cat(parts)  # (W * capacity, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _largest_row_count(x: torch.Tensor, group) -> int:
    """The largest row count over ranks: a host sync, only for callers that do not know their capacity."""
    rows = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    return int(rows.item())


def gather_with_grad(x: torch.Tensor, capacity: int | None = None, group=None) -> Gathered:
    """Every rank's (b_r, ...) rows, with gradients flowing back to each rank's own rows.

    `capacity` is an upper bound on any rank's b_r that every rank knows (the training loop passes its per-rank
    batch size); without it the ranks agree on one, at the cost of a host sync. One process: `x`, None, 0.
    """
    if not is_distributed():
        return Gathered(x, None, 0)
    if capacity is None:
        capacity = _largest_row_count(x, group)
    if x.shape[0] > capacity:
        raise ValueError(f"{x.shape[0]} rows on this rank exceed the gather capacity {capacity}")
    valid = torch.zeros(capacity, dtype=torch.uint8, device=x.device)
    valid[: x.shape[0]] = 1
    masks = [torch.empty_like(valid) for _ in range(dist.get_world_size(group))]
    dist.all_gather(masks, valid, group=group)
    rows = _GatherWithGrad.apply(x, capacity, group)
    return Gathered(rows, torch.cat(masks).bool(), dist.get_rank(group) * capacity)
