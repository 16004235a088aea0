"""Semantic-segmentation metrics the standard way (as mmseg computes them): one confusion matrix per dataset.

Intersection and union are summed over every pixel of every image before dividing, so large images
do not count more than their pixels and small classes are not averaged per image. Pixels labelled
`ignore_index` in the ground truth are left out; a class that appears neither in the ground truth nor
in the predictions has no IoU and is excluded from the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a (C, C) matrix: rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)  # labelled pixels predicted as no class at all

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add one image: `pred` and `target` are (H, W) integer class maps of the same shape.

        Predictions outside [0, C) (e.g. "no class" pixels) count as wrong for the target's class.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")
        pred = pred.astype(np.int64).ravel()
        target = target.astype(np.int64).ravel()
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        pred, target = pred[keep], target[keep]
        valid = (pred >= 0) & (pred < self.num_classes)
        # Valid predictions go into the matrix; invalid ones still count in the target's row total.
        c = self.num_classes
        self.matrix += np.bincount(target[valid] * c + pred[valid], minlength=c * c).reshape(c, c)
        self.missed += np.bincount(target[~valid], minlength=c)

    def compute(self, class_names: Sequence[str] | None = None) -> SegmentationMetrics:
        m = self.matrix
        intersection = np.diag(m).astype(np.float64)
        gt_total = m.sum(axis=1) + self.missed
        pred_total = m.sum(axis=0)
        union = gt_total + pred_total - intersection
        iou = np.full(self.num_classes, np.nan)
        present = union > 0
        iou[present] = intersection[present] / union[present]
        total = gt_total.sum()
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return SegmentationMetrics(
            miou=float(np.nanmean(iou)) if present.any() else float("nan"),
            pixel_accuracy=float(intersection.sum() / total) if total else float("nan"),
            per_class_iou={n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
            num_pixels=int(total),
        )


@dataclass
class SegmentationMetrics:
    """Scores of predicted label maps against ground truth: mean IoU, pixel accuracy, IoU per class and the
    labelled pixels counted."""

    miou: float  # mean IoU over classes present in the ground truth or the predictions
    pixel_accuracy: float  # correct / labelled pixels
    per_class_iou: dict[str, float | None]  # None: class absent from both, excluded from the mean
    num_pixels: int

    def to_dict(self) -> dict:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy,
                "per_class_iou": self.per_class_iou, "num_pixels": self.num_pixels}
