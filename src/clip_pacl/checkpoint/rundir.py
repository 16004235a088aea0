"""Training run directories: their layout, and as model sources (`--model runs/clip` means the model it produced).

A run dir (`clip-pacl train --out runs/clip`) is not itself a checkpoint: the trained model is in
`final/`, written when training ends, and resumable snapshots are in `checkpoints/step_N/`. Users point
at the run they trained, so `load` resolves it here, once, for every command that takes a model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from clip_pacl.errors import CheckpointError

FINAL = "final"
CHECKPOINTS = "checkpoints"
PREFIX = "step_"
DONE = "DONE"
TRAIN_STATE = "train_state.pt"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / DONE).is_file() and (path / TRAIN_STATE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted((p for p in found if is_complete(p)), key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_run_dir(src: str | Path) -> str | Path:
    """The model directory inside a training run dir (its `final/`, else its newest complete checkpoint,
    as while training is still going), saying which on stderr; any other `src` is returned unchanged."""
    path = Path(src)
    if not path.is_dir() or (path / "config.json").is_file():
        return src
    if (path / FINAL / "config.json").is_file():
        chosen, why = path / FINAL, "the final model"
    elif (path / CHECKPOINTS).is_dir():
        chosen = latest_checkpoint(path)
        if chosen is None:
            raise CheckpointError(f"{path} is a training run with no {FINAL}/ and no complete checkpoint yet "
                                  f"(under {path / CHECKPOINTS})")
        why = "no final/ yet (training still going or stopped), the newest complete checkpoint"
    else:
        return src
    print(f"{path} is a training run: using {chosen} ({why})", file=sys.stderr, flush=True)
    return chosen
