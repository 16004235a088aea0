"""The demo's run: synthetic data -> tiny CLIP -> zero-shot / retrieval / CLIPScore / index -> PACL -> segmentation.

Every phase is timed (wall and CPU seconds, in the summary's "phases"), so a slow run says where its time went.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from clip_pacl.console import log
from clip_pacl.device import resolve_device, resolve_precision
from clip_pacl.errors import ConfigError, MissingDependencyError

MARKER = ".clip-pacl-demo"  # written first into every demo directory: --overwrite deletes only such directories
# everything a demo writes at the top of its directory; --overwrite refuses a directory holding anything else
ENTRIES = frozenset({MARKER, "data", "clip_model.json", "clip", "pacl", "index", "figures", "pacl_overlay.png",
                     "summary.json", "report.html", "report.md"})


@dataclass(frozen=True)
class DemoConfig:
    """The walkthrough's settings (`clip-pacl demo`): output folder, dataset sizes, the CLIP and PACL
    training budgets and the evaluation's; the default step counts are sized to keep the whole run under ten
    minutes on a CPU (`benchmarks/demo_time.py` measures it)."""

    out: str = "demo_out"
    n_train: int = 6000
    n_test: int = 600
    # The step counts keep the run under ten minutes with a margin (benchmarks/demo_time.py measures a step); a
    # higher lr gave better zero-shot but worse patch features (PACL and MaskCLIP both fell).
    clip_steps: int = 550
    clip_lr: float = 1e-3
    pacl_steps: int = 300
    batch_size: int = 128
    pacl_batch_size: int = 256
    # the synthetic captions are at most 26 tokens long: a 32-token context (CLIP's is 77) halves a CLIP step's
    # cost; the text tower is causal and pools at the end-of-text token, so the padding it drops changed nothing
    context_length: int = 32
    validations: int = 4  # held-out retrieval during CLIP training, drawn on the loss curve
    # PACL on a tiny CLIP: MaskCLIP value-path tokens (the last block's attention mixes every patch with the
    # whole image) and a sharp pooling softmax; the paper's (tokens, 1.0) suits large pretrained CLIPs.
    pacl_patch_tokens: str = "maskclip"
    pacl_pool_temperature: float = 0.05
    # every method is scored at each of these (None: background by its prompt) and reported at its best
    background_thresholds: tuple[float | None, ...] = (None, 0.2, 0.3, 0.4, 0.5)
    figure_images: int = 4  # held-out images in the segmentation figure
    preset: str = "tiny"
    image_size: int = 64
    device: str | None = None
    # torch's CPU threads for the whole run (None: torch's default, one per core). --quick uses 1: at its sizes
    # every op is tiny, and two threads that must meet at each op's end wait for each other whenever the machine
    # is busy (measured under load 12 on 2 cores: segmentation 62-74 s with 2 threads, 5 s with 1; README)
    threads: int | None = None
    # data-loading processes: none. The demo's 64-px PNGs decode at ~600 images/s in the main process against a
    # training step's ~80 (README, "Data loading"), and each validation would start a worker process of its own.
    # The printed commands leave --workers out, so a user's own JPEGs get the default (data.dataset.default_workers)
    workers: int = 0
    # fp32, bf16 or auto: bf16 where the CPU has bfloat16 matrix units (AMX, AVX-512 BF16) or on a bf16 GPU
    # (`device.resolve_precision`), else fp32; resolved once per run, so a machine always gets the same answer. Both
    # trainings run under it (bf16: autocast) and the evaluations load the models at it.
    precision: str = "auto"
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    @classmethod
    def quick(cls, out: str, **kw: Any) -> DemoConfig:
        """A short version for tests and smoke runs: every phase and the whole report, tiny sizes."""
        return cls(out=out, **{"n_train": 64, "n_test": 24, "clip_steps": 4, "pacl_steps": 4, "batch_size": 16,
                               "pacl_batch_size": 16, "threads": 1, **kw})


class PhaseClock:
    """Wall and CPU seconds of named phases (CPU: all of this process's threads, so up to threads x wall)."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.phases[name] = {"seconds": round(time.perf_counter() - wall, 1),
                             "cpu_seconds": round(time.process_time() - cpu, 1)}
        log(f"      {name}: {self.phases[name]['seconds']} s (CPU {self.phases[name]['cpu_seconds']} s)")

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Make `out` a fresh demo directory. A non-empty one is an error unless `overwrite`; then it must be an earlier
    demo's (its marker file, nothing but what a demo writes), so --overwrite never deletes a user's own files."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out} exists and is not a directory: choose another --out")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty: pass --overwrite to replace it "
                          f"(or choose another --out)")
    if entries:
        foreign = [p.name for p in entries if p.name not in ENTRIES]
        if not (out / MARKER).is_file() or foreign:
            why = f"it holds {', '.join(foreign[:3])}" if foreign else f"it has no {MARKER} file"
            raise ConfigError(f"--overwrite replaces only a demo's own output, and {out} does not look like one "
                              f"({why}): delete it yourself or choose another --out")
        for entry in entries:
            if entry.name == MARKER:  # last, so an interrupted cleanup can be overwritten again
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `clip-pacl demo`; `clip-pacl demo --overwrite` may delete this folder\n")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` inside the block (None: left as they are), then restored."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every phase into `cfg.out`, write report.html, report.md and summary.json there; returns the summary."""
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"--threads must be at least 1, not {cfg.threads}")
    with torch_threads(cfg.threads):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import clip_pacl
    from clip_pacl.train import train
    from clip_pacl_app.demo.evaluate import evaluate_clip, evaluate_segmentation_methods
    from clip_pacl_app.demo.report import next_steps, write_report

    if importlib.util.find_spec("matplotlib") is None:  # before minutes of training, not after
        raise MissingDependencyError("matplotlib", "train", "the demo's report")
    out = Path(cfg.out)
    prepare_out_dir(out, cfg.overwrite)
    clock = PhaseClock()
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    log(f"precision: {precision}" + (f" ({cfg.precision})" if cfg.precision != precision else ""))
    summary: dict[str, Any] = {"config": asdict(cfg), "precision": precision, "environment": _environment()}
    with clock.phase("data"):
        log(f"[1/5] generating the synthetic dataset in {out / 'data'}")
        train_dir, test_dir = _generate_data(cfg, out / "data")
    with clock.phase("clip_train"):
        log(f"[2/5] training a '{cfg.preset}' CLIP for {cfg.clip_steps} steps")
        clip_config = clip_train_config(cfg, train_dir, test_dir, out, precision)
        clip_run = train(clip_config)
        summary["clip_train"] = _run_summary(clip_run)
    with clock.phase("clip_eval"):
        log("[3/5] evaluating the CLIP on held-out images: zero-shot, retrieval, CLIPScore; indexing them")
        clip = clip_pacl.load(clip_run.final_model, device=cfg.device, precision=precision)
        summary.update(evaluate_clip(clip, test_dir, out, cfg.progress))
    with clock.phase("pacl_train"):
        log(f"[4/5] training PACL embedders on the frozen CLIP for {cfg.pacl_steps} steps (captions only, no masks)")
        pacl_config = pacl_train_config(cfg, train_dir, out, precision)
        pacl_run = train(pacl_config)
        summary["pacl_train"] = _run_summary(pacl_run)
    with clock.phase("segmentation"):
        log("[5/5] segmenting held-out images by class name (colours, then shapes): raw patches, MaskCLIP, PACL")
        pacl = clip_pacl.load(pacl_run.final_model, device=cfg.device, precision=precision)
        summary.update(evaluate_segmentation_methods(clip, pacl, test_dir, out, cfg))
    summary["next_steps"] = next_steps(out, test_dir, clip_config, pacl_config)
    summary["phases"], summary["seconds"] = clock.phases, clock.total()
    with clock.phase("report"):
        summary["report"] = {k: str(v) for k, v in write_report(summary, out).items()}
    summary["phases"], summary["seconds"] = clock.phases, clock.total()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _generate_data(cfg: DemoConfig, data: Path) -> tuple[Path, Path]:
    """Training images with two captions each, and held-out images (another seed) with labels and masks."""
    from clip_pacl.data.synthetic import generate_synthetic

    train_dir, test_dir = data / "train", data / "test"
    generate_synthetic(train_dir, cfg.n_train, seed=cfg.seed, image_size=cfg.image_size, captions_per_image=2,
                       progress=cfg.progress)
    generate_synthetic(test_dir, cfg.n_test, seed=cfg.seed + 1_000_003, image_size=cfg.image_size,
                       progress=cfg.progress)
    return train_dir, test_dir


def clip_train_config(cfg: DemoConfig, train_dir: Path, test_dir: Path, out: Path, precision: str = "fp32"):
    """The CLIP run, from scratch: the preset with the demo's text context (written to OUT/clip_model.json),
    validated on the held-out captions, at the resolved `precision`."""
    from clip_pacl.config import CLIPConfig
    from clip_pacl.train import TrainConfig

    arch = CLIPConfig.from_name(cfg.preset)
    arch = replace(arch, text=replace(arch.text, context_length=cfg.context_length))
    model_file = out / "clip_model.json"
    model_file.write_text(json.dumps(arch.to_open_clip_dict(), indent=2) + "\n")
    return TrainConfig(
        data=str(train_dir / "captions.csv"), model=str(model_file), out=str(out / "clip"), steps=cfg.clip_steps,
        batch_size=cfg.batch_size, lr=cfg.clip_lr, seed=cfg.seed, device=cfg.device, workers=cfg.workers,
        image_size=cfg.image_size, val_data=str(test_dir / "captions.csv"),  # the default schedule
        val_every=max(1, cfg.clip_steps // cfg.validations), log_every=_log_every(cfg.clip_steps),
        precision=precision, progress=cfg.progress)


def pacl_train_config(cfg: DemoConfig, train_dir: Path, out: Path, precision: str = "fp32"):
    """The PACL run: embedders on the frozen CLIP, from cached CLIP features (the CLIP never changes), at the
    resolved `precision`."""
    from clip_pacl.train import TrainConfig

    return TrainConfig(
        data=str(train_dir / "captions.csv"), model=str(out / "clip" / "final"), out=str(out / "pacl"),
        objective="pacl", cache_features=True, steps=cfg.pacl_steps, batch_size=cfg.pacl_batch_size, lr=1e-3, wd=0.01,
        warmup=min(50, cfg.pacl_steps // 10), seed=cfg.seed, device=cfg.device, workers=cfg.workers,
        progress=cfg.progress,
        pacl={"patch_tokens": cfg.pacl_patch_tokens, "pool_temperature": cfg.pacl_pool_temperature},
        log_every=_log_every(cfg.pacl_steps), precision=precision)


def _log_every(steps: int) -> int:
    """Every 10 steps (the default), or often enough that a short run's loss curve still has 20 points."""
    return max(1, min(10, steps // 20))


def _environment() -> dict[str, Any]:
    """What the timings depend on."""
    import os
    import platform

    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _run_summary(run) -> dict[str, Any]:
    return {"steps": run.steps, "seconds": round(run.seconds, 1), "final_loss": run.final_loss,
            "model": run.final_model, "run_dir": run.run_dir, "val": run.val}
