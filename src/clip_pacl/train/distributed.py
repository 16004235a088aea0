"""Process-group setup for torchrun or SLURM, and the small all-reduce (on logging steps) that keeps ranks in step.

The data order is `clip_pacl.data.build_loader`'s: one seeded permutation per epoch, dealt to the
ranks, so one process with batch 2B sees exactly the pairs two processes with batch B see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from clip_pacl.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run: global rank, number of processes and rank on its machine
    (one process: 0, 1, 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Rank and world size from torchrun's variables, else SLURM's (srun without torchrun), else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device_type: str, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group (env:// rendezvous) when launched as several processes; NCCL on GPUs, gloo on CPU.
    `timeout`: how long a collective waits for the slowest rank (torch's default, 30 min for gloo, when None)."""
    info = env_dist_info()
    if not info.enabled or dist.is_initialized():
        return info
    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise ConfigError("distributed launch without MASTER_ADDR/MASTER_PORT "
                          "(use torchrun, or export them in SLURM)")
    # SLURM without torchrun: env:// reads RANK/WORLD_SIZE, so provide them.
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://", timeout=timeout)
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StepStats(NamedTuple):
    """What `reduce_step_stats` agrees on across ranks at a logging or checkpoint step."""

    loss: float | None  # mean over ranks of the last step's loss: the global batch's loss (None: no loss given)
    finite: bool  # every rank's every loss since the last log was finite
    n_bad: int  # unreadable images since the last sync, all ranks
    n_seen: int
    stop: bool  # some rank was asked to stop (SIGINT/SIGTERM): all stop at this step


def reduce_step_stats(info: DistInfo, loss: torch.Tensor | None, all_finite: torch.Tensor | None, n_bad: int,
                      n_seen: int, stop: bool) -> StepStats:
    """One small all-reduce, and the loop's one read of device values, keeps every rank's counters, loss and
    decision to stop identical. The loop calls it on logging and checkpoint steps only: it is a host sync."""
    device = loss.device if loss is not None else torch.device("cpu")
    values = torch.tensor([0.0, 0.0, n_bad, n_seen, float(stop)], dtype=torch.float64, device=device)
    if loss is not None:
        values[0] = loss.detach()
        values[1] = ~all_finite if all_finite is not None else 0.0
    if info.enabled:
        values = _for_backend(values)
        dist.all_reduce(values)
    total_loss, not_finite, bad, seen, stops = values.tolist()
    return StepStats(total_loss / info.world_size if loss is not None else None, not_finite == 0, int(bad), int(seen),
                     stops > 0)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.enabled:
        dist.barrier()


def all_ranks_ready(info: DistInfo, ready: bool) -> bool:
    """True when every rank has a full step's batches. A streaming dataset (webdataset shards) can give ranks
    different numbers of batches; each step attempt asks this once, so when one rank's shards run out every
    rank ends the epoch together. Otherwise the ranks drift into different epochs, and the checkpoint (written
    by rank 0, with rank 0's epoch and position) would resume the others at the wrong place."""
    if not info.enabled:
        return ready
    flag = _for_backend(torch.tensor([1 if ready else 0], dtype=torch.int32))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _for_backend(tensor: torch.Tensor) -> torch.Tensor:
    """A small CPU tensor moved to where the process group's collectives run (NCCL needs CUDA tensors)."""
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor
