"""Rows are what every reader returns: an image path plus a caption or a label; splits keep images whole."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar


@dataclass(frozen=True)
class CaptionRow:
    """One (image file, caption) pair of a caption dataset; an image with several captions has several rows."""

    image: Path
    caption: str


@dataclass(frozen=True)
class LabelRow:
    """One (image file, class name) pair of a labelled dataset (zero-shot and linear-probe evaluation)."""

    image: Path
    label: str


Row = TypeVar("Row", CaptionRow, LabelRow)


def split_by_image(rows: Sequence[Row], val_fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Hold out `val_fraction` of the distinct images (with all their rows) for validation.

    Splitting by row would put one caption of an image in training and another in validation,
    which inflates validation retrieval scores; splitting by image cannot leak. Row order is kept
    within each side, and the same seed gives the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    images = list(dict.fromkeys(row.image for row in rows))  # distinct, in first-seen order
    n_val = round(len(images) * val_fraction)
    if val_fraction > 0 and len(images) >= 2:
        n_val = min(max(n_val, 1), len(images) - 1)
    random.Random(seed).shuffle(images)
    val_images = set(images[:n_val])
    train = [row for row in rows if row.image not in val_images]
    val = [row for row in rows if row.image in val_images]
    return train, val
