"""Run checkpoints: `OUT/checkpoints/step_00000100/` = model dir (clip_pacl.save) + train_state.pt + DONE.

A checkpoint is written into a hidden temporary directory `.tmp-step_N-PID`, `DONE` (a small JSON manifest)
last, every file fsynced, and only then is the directory renamed into place (`clip_pacl.atomic.write_directory`;
a checkpoint of the same step saved again is set aside as `.old-step_N-PID` until the new one is in place):
a process killed at any moment leaves either a complete checkpoint or an ignored temporary directory, never
a half-written one. `remove_stale_temporaries` clears what a killed save left when training starts again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_pacl.atomic import recover_directory, write_directory
from clip_pacl.checkpoint import save as save_model
from clip_pacl.checkpoint.rundir import (  # noqa: F401 - the run layout, re-used by training
    CHECKPOINTS,
    DONE,
    PREFIX,
    TRAIN_STATE,
    checkpoint_root,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
)
from clip_pacl.errors import CheckpointError

TEMP, ASIDE = ".tmp-", ".old-"  # the prefixes of a save's temporary directory and of the checkpoint it replaces


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint in `run_dir` (None: start fresh); else a checkpoint or run dir."""
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(f"--resume {resume}: no complete checkpoint there (a step_N dir with {DONE}, or a run dir)")


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, train_state: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` complete ones."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:08d}"

    def write(folder: Path) -> None:
        save_model(model, folder)
        torch.save(train_state, folder / TRAIN_STATE)
        manifest = {"step": step, "time": time.time(), "files": sorted(p.name for p in folder.iterdir())}
        (folder / DONE).write_text(json.dumps(manifest) + "\n")  # last: the manifest of what is there

    write_directory(final, write, temp_prefix=f"{TEMP}{final.name}-", aside_name=f"{ASIDE}{final.name}-{os.getpid()}",
                    complete=is_complete)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Clean up after a killed save: delete its temporary directory; a checkpoint it had set aside to replace
    (the same step saved again) goes back in place when the replacement never arrived (`recover_directory`)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(ASIDE):  # .old-step_N-PID
            recover_directory(root / p.name[len(ASIDE):].rsplit("-", 1)[0], p, complete=is_complete)
        elif p.name.startswith(TEMP):
            shutil.rmtree(p, ignore_errors=True)


def load_train_state(path: Path) -> dict[str, Any]:
    """The optimiser/scheduler/scaler/RNG/data-position state of a checkpoint (tensors and plain values only)."""
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read {path / TRAIN_STATE}: {' '.join(str(e).split())[:200]}") from None
