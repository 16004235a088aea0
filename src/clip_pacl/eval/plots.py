"""Figures of an evaluation: the zero-shot confusion matrix and a retrieval grid (text queries, their top images).

A number says how often a model is wrong; these say where: which classes it mixes up, what it retrieves
instead. matplotlib (the `train`/`eval` extras) draws them with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from clip_pacl.data import load_image
from clip_pacl.errors import DataError, MissingDependencyError

LABELLED_CLASSES_MAX = 40  # past this, class names on the axes overlap: draw the matrix alone


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("matplotlib", "eval", "--plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def plot_confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                          path: str | Path) -> Path:
    """A PNG of the row-normalised confusion matrix (each true class's rows sum to 1, so rare classes show)."""
    plt = _pyplot()
    counts = confusion_matrix(predictions, targets, len(class_names)).double()  # (C, C)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(4 + 0.35 * n, 20)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= LABELLED_CLASSES_MAX:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"zero-shot confusion matrix (top-1 {float(counts.diagonal().sum() / counts.sum()):.1%})")
    return _save(fig, plt, path)


def plot_retrieval_grid(queries: Sequence[str], top_images: Sequence[Sequence[Path]], hits: Sequence[Sequence[bool]],
                        path: str | Path) -> Path:
    """A PNG with one row per text query: the query, then its top images, framed green where the image is the
    query's own (a hit) and red otherwise."""
    if not queries:
        raise DataError("no queries to draw")
    plt = _pyplot()
    k = max(len(row) for row in top_images)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(2 * (k + 1), 2 * len(queries)), squeeze=False)
    for row, (query, images, row_hits) in enumerate(zip(queries, top_images, hits)):
        axes[row][0].text(0.0, 0.5, _wrap(query), fontsize=9, va="center", ha="left", wrap=True)
        axes[row][0].axis("off")
        for col in range(k):
            ax = axes[row][col + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(images):
                ax.axis("off")
                continue
            ax.imshow(load_image(images[col]))
            for spine in ax.spines.values():
                spine.set_edgecolor("#2a2" if row_hits[col] else "#c22")
                spine.set_linewidth(3)
            if row == 0:
                ax.set_title(f"top {col + 1}", fontsize=9)
    fig.suptitle("text -> image retrieval (green: the caption's own image)")
    return _save(fig, plt, path)


def _wrap(text: str, width: int = 28) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
