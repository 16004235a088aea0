"""The training loop, top to bottom: setup, resume, then steps of (accumulate gradients, clip, AdamW, log, save).

Run layout (`OUT/`): `checkpoints/step_N/` (resumable, the newest `keep`), `final/` (the trained model,
a normal checkpoint dir for `clip_pacl.load`), `metrics.jsonl`, `tensorboard/`, `loss.png`,
`train_config.json`. Only rank 0 writes. A resumed run continues with the same weights, optimiser,
schedule, scaler, RNG states and data position, so it is the same run as one that was never stopped.

Host syncs: the loss stays on the device and the loop reads it (with its finiteness, the ranks' image
counters and stop requests) only on logging and checkpoint steps, as open_clip and nanoGPT do, so the
device is never made to wait for Python in between.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from clip_pacl.checkpoint import load as load_model
from clip_pacl.checkpoint import save as save_model
from clip_pacl.console import log
from clip_pacl.data import build_loader, set_loader_epoch
from clip_pacl.device import resolve_device, resolve_precision
from clip_pacl.errors import ConfigError, DataError
from clip_pacl.losses import Objective, get_objective
from clip_pacl.train import checkpointing as ckpt
from clip_pacl.train.config import TrainConfig
from clip_pacl.train.distributed import (
    DistInfo,
    StepStats,
    all_ranks_ready,
    barrier,
    cleanup_distributed,
    init_distributed,
    reduce_step_stats,
)
from clip_pacl.train.feature_cache import CachedFeatureModel, build_feature_cache
from clip_pacl.train.logging import RunLogger, plot_loss
from clip_pacl.train.optim import build_optimizer, clamp_logit_scale, lock_image_tower, lock_text_tower, set_train_mode
from clip_pacl.train.record import write_record
from clip_pacl.train.schedule import StepSchedule, default_warmup
from clip_pacl.train.setup import FeatureModel, batch_inputs, build_datasets, build_model

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BAD_CHECK_MIN_SAMPLES = 1000  # mid-epoch, judge the bad-image fraction only on this many samples or more
Micro = list[tuple[torch.Tensor, torch.Tensor]]  # one step's micro-batches' `inputs` on the device


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns: how far it got (steps, epoch, seconds), the last loss and validation metrics,
    where the checkpoints and the final model are, and how many images were unreadable."""

    steps: int
    epoch: int
    seconds: float
    final_loss: float | None
    val: dict[str, float] | None
    checkpoint: str | None  # the newest resumable checkpoint
    final_model: str  # OUT/final, loadable with clip_pacl.load
    run_dir: str
    n_bad: int
    n_seen: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainState:
    """Where a run stands. `saved()` goes into every checkpoint; resuming restores it."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed; a resumed loader starts after them
    n_bad: int = 0  # unreadable images skipped, all ranks, as of the last host sync
    n_seen: int = 0
    pending_bad: int = 0  # this rank's counts since the last host sync (host ints: counting costs no sync)
    pending_seen: int = 0

    def saved(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "n_bad": self.n_bad, "n_seen": self.n_seen}


@dataclass
class Run:
    """Everything a run builds once, before its first step."""

    config: TrainConfig
    objective: Objective
    info: DistInfo
    device: torch.device
    model: nn.Module  # the model being trained: saved, validated, clipped
    feature_model: nn.Module  # what a step calls: FeatureModel(model), under DDP / torch.compile when asked
    # (cached features: FeatureModel(CachedFeatureModel(model)))
    loader: DataLoader
    val_rows: list | None
    optimizer: torch.optim.Optimizer
    schedule: StepSchedule
    scaler: torch.amp.GradScaler
    logger: RunLogger
    steps_per_epoch: int
    total_steps: int
    global_batch: int

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches an epoch uses (whole steps; an epoch's leftover micro-batches are skipped)."""
        return self.steps_per_epoch * self.config.accum

    @property
    def sync_epoch_ends(self) -> bool:
        """Streaming data may give ranks unequal batch counts: they agree before each step that all have one."""
        return self.info.enabled and isinstance(self.loader.dataset, IterableDataset)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AMP_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class LogWindow:
    """The steps since the last log: the last loss and whether every loss was finite, kept on the device."""

    first_step: int
    good_at_start: int  # readable samples seen (all ranks) when the window opened
    start: float
    loss: torch.Tensor | None = None
    all_finite: torch.Tensor | None = None

    @classmethod
    def open(cls, state: TrainState) -> LogWindow:
        return cls(state.step + 1, state.n_seen - state.n_bad, time.perf_counter())

    def add(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)  # a device op: no host sync
        self.loss, self.all_finite = loss, finite if self.all_finite is None else self.all_finite & finite


def train(config: TrainConfig) -> TrainResult:
    """Train as `config` says; under torchrun (or SLURM) each process runs this and they form one DDP job."""
    device = resolve_device(config.device)
    asked = config.precision
    if config.precision == "auto":  # one answer for the whole run (and every rank): bf16 autocast or fp32
        config = replace(config, precision=resolve_precision("auto", device))
    if config.objective is not None:
        get_objective(config.objective)  # an unknown name fails before anything is built
    info = init_distributed(device.type)
    if info.is_main and asked != "fp32":  # the default says nothing; what was asked for is told
        log(f"precision: {config.precision}" + (" (autocast)" if config.precision in AMP_DTYPES else "")
            + (" (auto)" if asked == "auto" else ""))
    try:
        if device.type == "cuda" and info.enabled:
            device = torch.device("cuda", info.local_rank)
        return _train(config, info, device)
    finally:
        cleanup_distributed()


def _train(config: TrainConfig, info: DistInfo, device: torch.device) -> TrainResult:
    run = setup(config, info, device)
    config = run.config  # with the objective named (the model's own when the user gave none)
    state, last_checkpoint = resume(run)
    stop, window = _StopRequest(), LogWindow.open(state)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and info.is_main))
    start_time, loss_value, val_metrics, val_step = time.perf_counter(), None, None, -1
    set_train_mode(run.model)
    with stop.installed():
        for micro in micro_batches(run, state):
            lr = run.schedule.apply(state.step)
            window.add(optimizer_step(run, micro))
            state.step += 1
            bar.update(1)
            # ---------------------------------------------------- logs, validation, checkpoints on their steps
            due_log = state.step % config.log_every == 0 or state.step in (1, run.total_steps)
            due_save = bool(config.save_every and state.step % config.save_every == 0)
            due_val = bool(config.val_every and state.step % config.val_every == 0 and run.val_rows and info.is_main)
            stop_now = stop.requested and not info.enabled  # one process stops at once; DDP ranks agree at syncs
            stats = sync(run, state, window, stop.requested) if due_log or due_save or stop_now else None
            record: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
            if due_log:
                loss_value = stats.loss
                record.update(window_metrics(run, state, window, stats, lr))
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.0f}")
                window = LogWindow.open(state)
            if due_val:
                val_metrics, val_step = validate(run.model, run.val_rows, config, device), state.step
                set_train_mode(run.model)
                record.update({f"val_{k}": v for k, v in val_metrics.items()})
            if due_log or due_val:
                run.logger.log(record)
            if due_save or (stats is not None and stats.stop):
                last_checkpoint = save_checkpoint(run, state, last_checkpoint)
            if stats is not None and stats.stop:
                bar.close()
                _interrupted(run, state, last_checkpoint)
    bar.close()
    if state.batch_in_epoch >= run.batches_per_epoch:
        _report_epoch(run, state)
    last_checkpoint = save_checkpoint(run, state, last_checkpoint)
    final_dir = save_final_model(run)
    if run.val_rows and info.is_main and val_step != state.step:
        val_metrics = validate(run.model, run.val_rows, config, device)
        run.logger.log({"step": state.step, "epoch": state.epoch, **{f"val_{k}": v for k, v in val_metrics.items()}})
    run.logger.close()
    if info.is_main:
        plot_loss(run.run_dir)
    return TrainResult(steps=state.step, epoch=state.epoch, seconds=time.perf_counter() - start_time,
                       final_loss=loss_value, val=val_metrics,
                       checkpoint=str(last_checkpoint) if last_checkpoint else None, final_model=str(final_dir),
                       run_dir=str(run.run_dir), n_bad=state.n_bad, n_seen=state.n_seen)


def setup(config: TrainConfig, info: DistInfo, device: torch.device) -> Run:
    """Model, objective, data, optimiser and logger. Configuration mistakes (unknown preset, an objective the model
    does not train under, missing column, a dataset smaller than one step) fail here, before any work. The Run's
    config names the objective (the model's own when `config` gave none)."""
    run_dir = Path(config.out)
    existing = ckpt.latest_checkpoint(run_dir)
    if config.resume is None and existing is not None:
        raise ConfigError(f"{run_dir} already holds a run ({existing.name}); "
                          f"continue it with --resume auto or choose another --out")
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model, config = build_model(config)
    objective = get_objective(config.objective)
    image_size = config.image_size or getattr(model, "image_size", None)
    train_ds, val_rows = build_datasets(config, model, image_size)
    if config.cache_features:
        train_ds = build_feature_cache(model.to(device), train_ds, image_size, config.batch_size, config.workers,
                                       progress=config.progress and info.is_main)
    config = fit_batch_to_data(config, train_ds, info)
    global_batch = config.batch_size * config.accum * info.world_size
    loader = build_loader(train_ds, batch_size=config.batch_size, shuffle=True, workers=config.workers,
                          seed=config.seed, drop_last=True, rank=info.rank, world_size=info.world_size)
    steps_per_epoch = len(loader) // config.accum
    if steps_per_epoch == 0:
        raise DataError(f"{config.data} has {len(train_ds)} training pairs, fewer than one step's "
                        f"{global_batch} (batch size x accum x processes): lower --accum")
    if config.lock_image:
        lock_image_tower(model, config.lock_image_unlocked_groups)
    if config.lock_text:
        lock_text_tower(model)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    # after .to(device): the fused kernel is per device
    optimizer = build_optimizer(model, config.lr, config.wd, (config.beta1, config.beta2), config.eps)
    total_steps = config.steps or (config.epochs or 1) * steps_per_epoch
    feature_model: nn.Module = FeatureModel(CachedFeatureModel(model) if config.cache_features else model)
    if info.enabled:
        feature_model = DistributedDataParallel(feature_model,
                                                device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        feature_model = torch.compile(feature_model)
    return Run(config=config, objective=objective, info=info, device=device, model=model,
               feature_model=feature_model, loader=loader, val_rows=val_rows, optimizer=optimizer,
               schedule=StepSchedule(optimizer, config.lr, default_warmup(total_steps) if config.warmup is None
                                     else config.warmup, total_steps, kind=config.schedule),
               scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
               logger=RunLogger(run_dir, enabled=info.is_main), steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, global_batch=global_batch)


def fit_batch_to_data(config: TrainConfig, dataset, info: DistInfo) -> TrainConfig:
    """A dataset smaller than one step's pairs trains at the batch size it can fill (said on stderr): with 30
    photos, every step contrasts all 30. A resumed run of the same data gets the same batch. Streaming data,
    whose length is not known in advance, keeps the batch asked for."""
    if isinstance(dataset, IterableDataset):
        return config
    fits = len(dataset) // info.world_size // config.accum
    if fits < 1 or fits >= config.batch_size:
        return config  # (too few pairs for even one per micro-batch: the error below says so)
    if info.is_main:
        log(f"note: {config.data} has {len(dataset)} training pairs, fewer than one step's "
            f"{config.batch_size * config.accum * info.world_size} (--batch-size x --accum x processes): "
            f"training with --batch-size {fits}")
    return replace(config, batch_size=fits)


def resume(run: Run) -> tuple[TrainState, Path | None]:
    """The state to start from: a checkpoint's (weights, optimiser, schedule, scaler, RNG, data position), or step 0.

    Returns (state, the checkpoint resumed from or None)."""
    config, logger = run.config, run.logger
    if run.info.is_main:  # first, so that a checkpoint a killed save had moved aside is back in place
        ckpt.remove_stale_temporaries(run.run_dir)
    barrier(run.info)
    source = ckpt.resolve_resume(config.resume, run.run_dir) if config.resume else None
    state = TrainState()
    if source is not None:
        saved = ckpt.load_train_state(source)
        _check_compatible(saved["config"], config, run.global_batch, saved.get("global_batch"))
        run.model.load_state_dict(load_model(source).state_dict())
        run.optimizer.load_state_dict(saved["optimizer"])
        run.schedule.load_state_dict(saved["schedule"])
        run.scaler.load_state_dict(saved["scaler"])
        state = TrainState(**{key: saved[key] for key in TrainState().saved()})
        ckpt.set_rng_state(saved["rng"])
        logger.note(f"resuming from {source} (step {state.step}/{run.total_steps}, epoch {state.epoch})")
        logger.truncate_after(state.step)
    else:
        if config.resume == "auto":
            logger.note(f"no checkpoint in {run.run_dir}: starting a new run")
        logger.truncate_after(0)  # a new run starts a new metrics.jsonl
    if run.info.is_main:
        (run.run_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return state, source


def micro_batches(run: Run, state: TrainState) -> Iterator[Micro]:
    """Each step's `accum` micro-batches (on the device), from where `state` stands to the run's last step.

    Owns the data position: epochs (each its own seeded order), the micro-batches consumed (saved for
    resume), the unreadable-image counts, and, for streaming data under DDP, the ranks' agreement that
    every rank has a full step (else all end the epoch together).
    """
    while state.step < run.total_steps:
        if state.batch_in_epoch >= run.batches_per_epoch:
            _report_epoch(run, state)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        steps_before, fresh_epoch = state.step, state.batch_in_epoch == 0
        yield from _epoch_steps(run, state)
        if state.step == steps_before and fresh_epoch:  # (a resumed epoch may legitimately have no step left)
            raise DataError(f"an epoch ended without a single step (rank {run.info.rank} of {run.info.world_size} "
                            f"got fewer than {run.config.accum} batch(es) of {run.config.batch_size}); "
                            f"check the data")


def _epoch_steps(run: Run, state: TrainState) -> Iterator[Micro]:
    """The steps left in `state.epoch`; the epoch is over when its batches are used or the data runs out."""
    set_loader_epoch(run.loader, state.epoch, state.batch_in_epoch)
    micro: Micro = []
    for batch in run.loader:
        state.batch_in_epoch += 1
        state.pending_bad += batch.n_bad
        state.pending_seen += batch.n_total
        if len(batch) == 0:  # every image of this micro-batch was unreadable
            continue
        inputs = batch_inputs(run.model, batch, 16 if run.config.compile else 1)  # host: no sync
        micro.append(tuple(x.to(run.device, non_blocking=True) for x in inputs))
        if len(micro) < run.config.accum:
            continue
        if run.sync_epoch_ends and not all_ranks_ready(run.info, True):  # another rank's shards ran out
            break
        yield micro
        micro = []
        if state.step >= run.total_steps or state.batch_in_epoch >= run.batches_per_epoch:
            return
    else:  # the loader ran out early (a streaming dataset's length is approximate)
        if run.sync_epoch_ends:
            all_ranks_ready(run.info, False)
    state.batch_in_epoch = run.batches_per_epoch


def optimizer_step(run: Run, micro: Micro) -> torch.Tensor:
    """One AdamW step on the contrastive batch `micro`: gradients (fp16: scaled), unscaled then clipped, the
    scaler's step (skipped when a gradient is inf/NaN), the temperature clamped. Returns the loss, on the device."""
    config = run.config
    loss = accumulate_gradients(run.feature_model, run.objective, micro, run.autocast, run.scaler.scale,
                                config.local_loss, capacity=config.batch_size * config.accum)
    if config.grad_clip:
        run.scaler.unscale_(run.optimizer)  # clip the true gradient, not the fp16-scaled one
        nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale(run.model)
    return loss


def sync(run: Run, state: TrainState, window: LogWindow | None = None, stop: bool = False) -> StepStats:
    """The loop's host sync (logging, checkpoint and epoch-end steps only): the ranks' image counts join the run's
    totals, and a loss that was not finite since the last log is an error."""
    stats = reduce_step_stats(run.info, window and window.loss, window and window.all_finite, state.pending_bad,
                              state.pending_seen, stop)
    state.n_bad, state.n_seen = state.n_bad + stats.n_bad, state.n_seen + stats.n_seen
    state.pending_bad = state.pending_seen = 0
    if not stats.finite:
        steps = f"step {state.step}" if window.first_step == state.step else f"steps {window.first_step}-{state.step}"
        raise FloatingPointError(f"the loss was not finite at {steps} (now {stats.loss}): lower --lr or use "
                                 f"--precision fp32")
    return stats


def window_metrics(run: Run, state: TrainState, window: LogWindow, stats: StepStats, lr: float) -> dict[str, Any]:
    """A log line's training numbers; checks the bad-image fraction once enough images were seen."""
    if state.n_seen >= BAD_CHECK_MIN_SAMPLES:
        _check_bad_fraction(state.n_bad, state.n_seen, run.config.max_bad_fraction)
    samples = state.n_seen - state.n_bad - window.good_at_start
    elapsed = time.perf_counter() - window.start
    return {"loss": stats.loss, "lr": lr, "logit_scale": float(run.model.logit_scale.detach().exp()),
            "samples_per_s": samples / max(elapsed, 1e-9), "n_bad": state.n_bad}


def save_checkpoint(run: Run, state: TrainState, last: Path | None) -> Path | None:
    """Write the resumable checkpoint of `state.step` (rank 0, once per step); returns the newest checkpoint."""
    if not run.info.is_main or (last is not None and last.name.endswith(f"{state.step:08d}")):
        return last
    train_state = {"config": run.config.to_dict(), "global_batch": run.global_batch,
                   "optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
                   "scaler": run.scaler.state_dict(), **state.saved(), "rng": ckpt.rng_state()}
    return ckpt.save_checkpoint(run.run_dir, state.step, run.model, train_state, run.config.keep)


def save_final_model(run: Run) -> Path:
    """The one place the trained model is written: OUT/final, a plain checkpoint dir for `clip_pacl.load`."""
    final_dir = run.run_dir / "final"
    if run.info.is_main:
        save_model(run.model, final_dir)
        write_record(final_dir, run.config.to_dict(), run.total_steps)  # what it was trained on (`train/record.py`)
    return final_dir


def _interrupted(run: Run, state: TrainState, checkpoint: Path | None) -> None:
    run.logger.note(f"interrupted at step {state.step}/{run.total_steps}: checkpoint {checkpoint}; "
                    f"continue with --resume auto")
    run.logger.close()
    raise KeyboardInterrupt


def accumulate_gradients(
    feature_model: nn.Module, objective: Objective, micro: list[tuple[torch.Tensor, torch.Tensor]],
    autocast=contextlib.nullcontext, scale=lambda loss: loss, local_loss: bool = False, capacity: int | None = None,
) -> torch.Tensor:
    """Backpropagate the loss of all micro-batches as ONE contrastive batch; returns that loss.

    With several micro-batches (open_clip's accum_freq): a no-grad pass computes every micro-batch's
    features, then each micro-batch is recomputed with grad and put in place of its cached slice, and
    the loss over the full set is backpropagated. Each backward gives the gradient through one slice,
    so their sum is exactly the gradient of the big batch, with the memory of one micro-batch. (open_clip
    adds the temperature's gradient once per micro-batch; here it is taken once, as in the big batch.)
    `capacity`: the most rows a step can hold on one rank (batch size x accum), so the ranks gather without
    exchanging row counts (no host sync; see `losses.distributed`).
    """
    if len(micro) == 1:
        with autocast():
            image_side, text_side, logit_scale, logit_bias = feature_model(*micro[0])
            loss = objective.loss(image_side, text_side, logit_scale, logit_bias, local_loss=local_loss,
                                  capacity=capacity)
        scale(loss).backward()
        return loss.detach()
    with torch.no_grad(), autocast():
        cached = [feature_model(images, texts)[:2] for images, texts in micro]
    for j, (images, texts) in enumerate(micro):
        last = j == len(micro) - 1
        no_sync = feature_model.no_sync if (not last and hasattr(feature_model, "no_sync")) else contextlib.nullcontext
        with no_sync(), autocast():
            image_j, text_j, logit_scale, logit_bias = feature_model(images, texts)
            if not last:  # the temperature and bias act on the whole batch: take their gradient once
                logit_scale = logit_scale.detach()
                logit_bias = logit_bias.detach() if logit_bias is not None else None
            image_side = torch.cat([image_j if k == j else c[0] for k, c in enumerate(cached)])
            text_side = torch.cat([text_j if k == j else c[1] for k, c in enumerate(cached)])
            loss = objective.loss(image_side, text_side, logit_scale, logit_bias, local_loss=local_loss,
                                  capacity=capacity)
        scale(loss).backward()
    return loss.detach()


def validate(model: nn.Module, rows: list, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Held-out retrieval recall@1 both ways (and mean recall@{1,5,10})."""
    from clip_pacl.retrieval.evaluate import evaluate_retrieval

    result = evaluate_retrieval(model, rows, batch_size=max(config.batch_size, 32), workers=config.workers,
                                device=device, ks=(1, 5, 10), progress=False)
    keep = ("text_to_image_R@1", "image_to_text_R@1", "text_to_image_R@5", "image_to_text_R@5", "mean_recall")
    return {k: float(result[k]) for k in keep if k in result}


def _check_bad_fraction(n_bad: int, n_seen: int, limit: float) -> None:
    if n_seen and n_bad / n_seen > limit:
        raise DataError(f"{n_bad} of {n_seen} images could not be read ({n_bad / n_seen:.1%}), more than "
                        f"--max-bad-fraction {limit:g}; fix the data or raise the limit")


def _report_epoch(run: Run, state: TrainState) -> None:
    """End of an epoch: a host sync brings in the ranks' image counts, then the bad-image fraction is judged."""
    sync(run, state)
    if state.n_bad:
        run.logger.note(f"epoch {state.epoch}: {state.n_bad} unreadable images skipped so far "
                        f"({state.n_bad}/{state.n_seen})")
    _check_bad_fraction(state.n_bad, state.n_seen, run.config.max_bad_fraction)


def _check_compatible(saved: dict[str, Any], config: TrainConfig, global_batch: int, saved_batch: int | None) -> None:
    """A resumed run must see the data the same way: same data, seed and global batch."""
    for key in ("data", "seed", "objective"):
        if saved.get(key) != getattr(config, key):
            raise ConfigError(f"cannot resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                              f"this run has {getattr(config, key)!r}")
    if saved_batch is not None and saved_batch != global_batch:
        raise ConfigError(f"cannot resume: the checkpoint's global batch is {saved_batch}, "
                          f"this run's is {global_batch}")


class _StopRequest:
    """SIGINT / SIGTERM (Ctrl-C, SLURM preemption) ask the loop to save a checkpoint and stop: one process at the
    next step, DDP ranks at the next logging or checkpoint step (where they agree, so all stop at the same step)."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
