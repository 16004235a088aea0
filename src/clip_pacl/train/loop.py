"""The training loop, top to bottom: setup, resume, then steps of (accumulate gradients, clip, AdamW, log, save).

Run layout (`OUT/`): `checkpoints/step_N/` (resumable, the newest `keep`), `final/` (the trained model,
a normal checkpoint dir for `clip_pacl.load`), `metrics.jsonl`, `tensorboard/`, `loss.png`,
`train_config.json`. Only rank 0 writes. A resumed run continues with the same weights, optimiser,
schedule, scaler, RNG states and data position, so it is the same run as one that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import IterableDataset
from tqdm import tqdm

from clip_pacl.checkpoint import load as load_model
from clip_pacl.checkpoint import save as save_model
from clip_pacl.data import build_loader, set_loader_epoch
from clip_pacl.device import resolve_device
from clip_pacl.errors import ConfigError, DataError
from clip_pacl.losses import Objective, get_objective
from clip_pacl.train import checkpointing as ckpt
from clip_pacl.train.config import TrainConfig
from clip_pacl.train.distributed import (
    DistInfo,
    all_ranks_ready,
    cleanup_distributed,
    init_distributed,
    reduce_step_stats,
)
from clip_pacl.train.logging import RunLogger, plot_loss
from clip_pacl.train.optim import build_optimizer, clamp_logit_scale, lock_image_tower, lock_text_tower, set_train_mode
from clip_pacl.train.schedule import WarmupCosine
from clip_pacl.train.setup import FeatureModel, build_datasets, build_model

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BAD_CHECK_MIN_SAMPLES = 1000  # mid-epoch, judge the bad-image fraction only on this many samples or more


@dataclass(frozen=True)
class TrainResult:
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


def train(config: TrainConfig) -> TrainResult:
    """Train as `config` says; under torchrun (or SLURM) each process runs this and they form one DDP job."""
    device = resolve_device(config.device)
    objective = get_objective(config.objective)
    info = init_distributed(device.type)
    try:
        if device.type == "cuda" and info.enabled:
            device = torch.device("cuda", info.local_rank)
        return _train(config, objective, info, device)
    finally:
        cleanup_distributed()


def _train(config: TrainConfig, objective: Objective, info: DistInfo, device: torch.device) -> TrainResult:
    run_dir = Path(config.out)
    if config.resume is None and ckpt.latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run ({ckpt.latest_checkpoint(run_dir).name}); "
                          f"continue it with --resume auto or choose another --out")
    # ---------------------------------------------------------------- model and data (config errors fail here)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, objective)
    image_size = config.image_size or getattr(model, "image_size", None)
    train_ds, val_rows = build_datasets(config, model, image_size)
    if config.cache_features:
        from clip_pacl.train.feature_cache import build_feature_cache

        train_ds = build_feature_cache(model.to(device), train_ds, image_size, config.batch_size, config.workers,
                                       progress=config.progress and info.is_main)
    global_batch = config.batch_size * config.accum * info.world_size
    loader = build_loader(train_ds, batch_size=config.batch_size, shuffle=True, workers=config.workers,
                          seed=config.seed, drop_last=True, rank=info.rank, world_size=info.world_size)
    steps_per_epoch = len(loader) // config.accum  # whole steps; leftover micro-batches of an epoch are skipped
    if steps_per_epoch == 0:
        raise DataError(f"{config.data} has {len(train_ds)} training pairs, fewer than one step's "
                        f"{global_batch} (batch size x accum x processes)")
    total_steps = config.steps or (config.epochs or 1) * steps_per_epoch
    if config.lock_image:
        lock_image_tower(model, config.lock_image_unlocked_groups)
    if config.lock_text:
        lock_text_tower(model)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    optimizer = build_optimizer(model, config.lr, config.wd, (config.beta1, config.beta2), config.eps)
    schedule = WarmupCosine(optimizer, config.lr, config.warmup, total_steps)
    amp_dtype = AMP_DTYPES.get(config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    logger = RunLogger(run_dir, enabled=info.is_main)

    # ---------------------------------------------------------------- resume
    step, epoch, batch_in_epoch, n_bad, n_seen = 0, 0, 0, 0, 0
    resume_from = ckpt.resolve_resume(config.resume, run_dir) if config.resume else None
    if resume_from is not None:
        state = ckpt.load_train_state(resume_from)
        _check_compatible(state["config"], config, global_batch, state.get("global_batch"))
        model.load_state_dict(load_model(resume_from).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        n_bad, n_seen = state["n_bad"], state["n_seen"]
        ckpt.set_rng_state(state["rng"])
        logger.note(f"resuming from {resume_from} (step {step}/{total_steps}, epoch {epoch})")
        logger.truncate_after(step)
    else:
        if config.resume == "auto":
            logger.note(f"no checkpoint in {run_dir}: starting a new run")
        logger.truncate_after(0)  # a new run starts a new metrics.jsonl
    if info.is_main:
        ckpt.remove_stale_temporaries(run_dir)
        (run_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    feature_model: nn.Module = FeatureModel(model)
    if info.enabled:
        feature_model = DistributedDataParallel(feature_model, device_ids=[device.index] if device.type == "cuda"
                                                else None)
    if config.compile:
        feature_model = torch.compile(feature_model)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def checkpoint_state() -> dict[str, Any]:
        return {"config": config.to_dict(), "global_batch": global_batch, "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "n_bad": n_bad, "n_seen": n_seen, "rng": ckpt.rng_state()}

    last_checkpoint: Path | None = resume_from

    def save() -> None:
        nonlocal last_checkpoint
        if info.is_main and (last_checkpoint is None or not last_checkpoint.name.endswith(f"{step:08d}")):
            last_checkpoint = ckpt.save_checkpoint(run_dir, step, model, checkpoint_state(), config.keep)

    # ---------------------------------------------------------------- the loop
    stop = _StopRequest()
    # streaming data may give ranks unequal batch counts: agree before each step that every rank has one
    sync_epoch_ends = info.enabled and isinstance(loader.dataset, IterableDataset)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress and info.is_main))
    start_time, loss_value, val_metrics, val_step = time.perf_counter(), None, None, -1
    window_start, window_samples = time.perf_counter(), 0
    set_train_mode(model)
    with stop.installed():
        while step < total_steps:
            if batch_in_epoch >= steps_per_epoch * config.accum:
                _report_epoch(logger, epoch, n_bad, n_seen, config.max_bad_fraction)
                epoch, batch_in_epoch = epoch + 1, 0
            set_loader_epoch(loader, epoch, batch_in_epoch)
            micro: list[tuple[torch.Tensor, torch.Tensor]] = []
            step_bad = step_seen = 0
            steps_before, fresh_epoch = step, batch_in_epoch == 0
            for batch in loader:
                batch_in_epoch += 1
                step_bad, step_seen = step_bad + batch["n_bad"], step_seen + batch["n_total"]
                if len(batch["images"]) == 0:  # every image of this micro-batch was unreadable
                    continue
                micro.append((batch["images"].to(device, non_blocking=True),
                              batch["texts"].to(device, non_blocking=True)))
                if len(micro) < config.accum:
                    continue
                if sync_epoch_ends and not all_ranks_ready(info, True):  # another rank's shards ran out
                    batch_in_epoch = steps_per_epoch * config.accum
                    break
                # ------------------------------------------------ one optimiser step
                lr = schedule.apply(step)
                loss = accumulate_gradients(feature_model, objective, micro, autocast, scaler.scale, config.local_loss)
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                clamp_logit_scale(model)
                step += 1
                stats = reduce_step_stats(info, loss.detach(), step_bad, step_seen, stop.requested)
                n_bad, n_seen, loss_value = n_bad + stats.n_bad, n_seen + stats.n_seen, stats.loss
                micro, step_bad, step_seen = [], 0, 0
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {step}: lower --lr or use --precision fp32")
                window_samples += stats.n_seen - stats.n_bad
                bar.update(1)
                # ------------------------------------------------ logs, validation, checkpoints
                due_log = step % config.log_every == 0 or step == total_steps
                due_val = bool(config.val_every and step % config.val_every == 0 and val_rows and info.is_main)
                record: dict[str, Any] = {"step": step, "epoch": epoch}
                if due_log:
                    elapsed = time.perf_counter() - window_start
                    record.update(loss=loss_value, lr=lr, logit_scale=float(model.logit_scale.detach().exp()),
                                  samples_per_s=window_samples / max(elapsed, 1e-9), n_bad=n_bad)
                    window_start, window_samples = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.0f}")
                    if n_seen >= BAD_CHECK_MIN_SAMPLES:
                        _check_bad_fraction(n_bad, n_seen, config.max_bad_fraction)
                if due_val:
                    val_metrics, val_step = validate(model, val_rows, config, device), step
                    set_train_mode(model)
                    record.update({f"val_{k}": v for k, v in val_metrics.items()})
                if due_log or due_val:
                    logger.log(record)
                if config.save_every and step % config.save_every == 0:
                    save()
                if stats.stop:
                    save()
                    bar.close()
                    logger.note(f"interrupted at step {step}/{total_steps}: checkpoint {last_checkpoint}; "
                                f"continue with --resume auto")
                    logger.close()
                    raise KeyboardInterrupt
                if step >= total_steps or batch_in_epoch >= steps_per_epoch * config.accum:
                    break
            else:  # the loader ran out early (a streaming dataset's length is approximate): the epoch is over
                if sync_epoch_ends:
                    all_ranks_ready(info, False)
                batch_in_epoch = steps_per_epoch * config.accum
            if step == steps_before and fresh_epoch:  # (a resumed epoch may legitimately have no step left)
                raise DataError(f"an epoch ended without a single step (rank {info.rank} of {info.world_size} "
                                f"got fewer than {config.accum} batch(es) of {config.batch_size}); check the data")
    bar.close()
    if batch_in_epoch >= steps_per_epoch * config.accum:
        _report_epoch(logger, epoch, n_bad, n_seen, config.max_bad_fraction)
    save()
    final_dir = run_dir / "final"
    if info.is_main:
        save_model(model, final_dir)
    if val_rows and info.is_main and val_step != step:
        val_metrics, val_step = validate(model, val_rows, config, device), step
        logger.log({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in val_metrics.items()}})
    logger.close()
    if info.is_main:
        plot_loss(run_dir)
    return TrainResult(steps=step, epoch=epoch, seconds=time.perf_counter() - start_time, final_loss=loss_value,
                       val=val_metrics, checkpoint=str(last_checkpoint) if last_checkpoint else None,
                       final_model=str(final_dir), run_dir=str(run_dir), n_bad=n_bad, n_seen=n_seen)


def accumulate_gradients(
    feature_model: nn.Module, objective: Objective, micro: list[tuple[torch.Tensor, torch.Tensor]],
    autocast=contextlib.nullcontext, scale=lambda loss: loss, local_loss: bool = False,
) -> torch.Tensor:
    """Backpropagate the loss of all micro-batches as ONE contrastive batch; returns that loss.

    With several micro-batches (open_clip's accum_freq): a no-grad pass computes every micro-batch's
    features, then each micro-batch is recomputed with grad and put in place of its cached slice, and
    the loss over the full set is backpropagated. Each backward gives the gradient through one slice,
    so their sum is exactly the gradient of the big batch, with the memory of one micro-batch. (open_clip
    adds the temperature's gradient once per micro-batch; here it is taken once, as in the big batch.)
    """
    if len(micro) == 1:
        with autocast():
            image_side, text_side, logit_scale, logit_bias = feature_model(*micro[0])
            loss = objective.loss(image_side, text_side, logit_scale, logit_bias, local_loss=local_loss)
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
            loss = objective.loss(image_side, text_side, logit_scale, logit_bias, local_loss=local_loss)
        scale(loss).backward()
    return loss.detach()


def validate(model: nn.Module, rows: list, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Held-out retrieval recall@1 both ways (and mean recall@{1,5,10})."""
    from clip_pacl.eval.retrieval import evaluate_retrieval

    result = evaluate_retrieval(model, rows, batch_size=max(config.batch_size, 32), workers=config.workers,
                                device=device, ks=(1, 5, 10), progress=False)
    keep = ("text_to_image_R@1", "image_to_text_R@1", "text_to_image_R@5", "image_to_text_R@5", "mean_recall")
    return {k: float(result[k]) for k in keep if k in result}


def _check_bad_fraction(n_bad: int, n_seen: int, limit: float) -> None:
    if n_seen and n_bad / n_seen > limit:
        raise DataError(f"{n_bad} of {n_seen} images could not be read ({n_bad / n_seen:.1%}), more than "
                        f"--max-bad-fraction {limit:g}; fix the data or raise the limit")


def _report_epoch(logger: RunLogger, epoch: int, n_bad: int, n_seen: int, limit: float) -> None:
    if n_bad:
        logger.note(f"epoch {epoch}: {n_bad} unreadable images skipped so far ({n_bad}/{n_seen})")
    _check_bad_fraction(n_bad, n_seen, limit)


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
    """SIGINT / SIGTERM (Ctrl-C, SLURM preemption) ask the loop to save a checkpoint and stop at the next step."""

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
