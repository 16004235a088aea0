"""What a model was trained on: `final/training.json`, written beside the trained model, read by `clip-pacl serve`.

A run's `train_config.json` says the same for the whole run directory, but a model directory is often copied on
its own; the record travels with it. Models trained before the record existed are read from their run's
`train_config.json` (when `final/` or `checkpoints/step_N/` still sits in its run directory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORD_NAME = "training.json"
RUN_CONFIG_NAME = "train_config.json"


def write_record(model_dir: str | Path, config: dict[str, Any], steps: int) -> Path:
    """`model_dir/training.json`: the data, the starting model, the objective and the steps of the run."""
    record = {"data": config.get("data"), "from": config.get("model"), "objective": config.get("objective"),
              "steps": steps, "batch_size": config.get("batch_size")}
    path = Path(model_dir) / RECORD_NAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_record(model_source: str | Path) -> dict[str, Any] | None:
    """What the model at `model_source` (a model or run directory) was trained on, with paths shortened to their
    last two parts (no answer of the server names its files in full), or None when nothing is recorded."""
    found = _find(Path(model_source))
    if found is None:
        return None
    try:
        data = json.loads(found.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    steps = data.get("steps") if found.name == RECORD_NAME else data.get("steps") or data.get("epochs")
    unit = "epochs" if found.name == RUN_CONFIG_NAME and not data.get("steps") and data.get("epochs") else "steps"
    return {"data": _short(data.get("data")), "from": _short(data.get("from", data.get("model"))),
            "objective": data.get("objective") if isinstance(data.get("objective"), str) else None,
            "steps": steps if isinstance(steps, int) else None, "unit": unit}


def _find(source: Path) -> Path | None:
    if not source.is_dir():
        return None
    if (source / RECORD_NAME).is_file():
        return source / RECORD_NAME
    final = source / "final" / RECORD_NAME  # a run directory: its final model's record
    if final.is_file():
        return final
    for run_dir in (source, source.parent, source.parent.parent):  # a run dir, its final/, checkpoints/step_N/
        if (run_dir / RUN_CONFIG_NAME).is_file():
            return run_dir / RUN_CONFIG_NAME
    return None


def _short(path: Any) -> str | None:
    if not isinstance(path, str) or not path:
        return None
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else path
