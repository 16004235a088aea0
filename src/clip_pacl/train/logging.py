"""Run logs: metrics.jsonl (always), TensorBoard scalars (when installed), loss.png at the end (matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class RunLogger:
    """Writes on the main process only; the others get a logger that does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.note("tensorboard is not installed: no TensorBoard logs (pip install 'clip-pacl[train]')")
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl and the numeric fields to TensorBoard at `record["step"]`."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key.replace("val_", "val/"), value, record["step"])
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint, so each step is logged once."""
        path = self.run_dir / METRICS
        if not self.enabled or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if _step(line) is not None and _step(line) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def plot_loss(run_dir: str | Path) -> Path | None:
    """loss.png from metrics.jsonl (loss, and val recall@1 when logged); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_text_to_image_R@1" in r]
    if not train:
        return None
    fig = loss_figure(plt, train, val)
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def loss_figure(plt, train: list[dict[str, Any]], val: list[dict[str, Any]]):
    """The loss curve (and val recall@1 on a second axis); the legend sits above the axes, never on a curve."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if val:
        ax2 = ax.twinx()
        lines += ax2.plot([r["step"] for r in val], [r["val_text_to_image_R@1"] for r in val], "o-",
                          color="tab:orange", label="val text->image R@1")
        ax2.set_ylabel("recall@1")
        ax2.set_ylim(0, 1)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=len(lines), frameon=False)
    fig.tight_layout()
    return fig
