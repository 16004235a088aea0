"""Training run directories as model sources: `--model runs/clip` means the model that run produced.

A run dir (`clip-pacl train --out runs/clip`) is not itself a checkpoint: the trained model is in
`final/`, written when training ends, and resumable snapshots are in `checkpoints/step_N/`. Users point
at the run they trained, so `load` resolves it here, once, for every command that takes a model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from clip_pacl.errors import CheckpointError

FINAL = "final"


def resolve_run_dir(src: str | Path) -> str | Path:
    """The model directory inside a training run dir (its `final/`, else its newest complete checkpoint,
    as while training is still going), saying which on stderr; any other `src` is returned unchanged."""
    path = Path(src)
    if not path.is_dir() or (path / "config.json").is_file():
        return src
    from clip_pacl.train.checkpointing import CHECKPOINTS, latest_checkpoint

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
