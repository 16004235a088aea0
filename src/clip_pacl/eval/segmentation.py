"""Open-vocabulary segmentation evaluation: segment every image of a dataset by its class names, score mIoU.

The class names are the prompts (no training on the dataset's labels); one text embedding per class
is computed once for the whole dataset, and images are scored in batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from clip_pacl.data.segmentation import IGNORE_INDEX, open_segmentation_dataset
from clip_pacl.errors import DataError
from clip_pacl.segmentation.metrics import ConfusionMatrix
from clip_pacl.segmentation.predict import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    default_method,
    labels_from_scores,
    score_maps,
)


def evaluate_segmentation(
    model: torch.nn.Module,
    data: str | Path,
    method: str | None = None,
    background_threshold: float | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 16,
    sliding_window: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """mIoU, pixel accuracy and per-class IoU of `model` on the segmentation dataset at `data`.

    `background_threshold` turns low-scoring pixels into the dataset's background class (it needs one).
    Unreadable images are skipped and counted, not fatal.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {batch_size})")
    dataset = open_segmentation_dataset(data)
    if background_threshold is not None and dataset.background_index is None:
        raise DataError(f"--background-threshold needs a 'background' class, and the {dataset.name} dataset "
                        "has none")
    method = method or default_method(model)
    model.eval()
    text_features = class_embeddings(model, dataset.class_names, templates, method)  # (C, D)
    confusion = ConfusionMatrix(len(dataset.class_names), IGNORE_INDEX)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    skipped: list[str] = []
    start = time.perf_counter()
    bar = tqdm(total=n, desc="segmentation", unit="img", disable=not progress)
    for first in range(0, n, batch_size):
        images, masks = [], []
        for i in range(first, min(first + batch_size, n)):
            try:
                image, mask = dataset[i]
            except DataError as e:
                skipped.append(str(e))
                continue
            images.append(image)
            masks.append(mask)
        if images:
            for scores, mask in zip(score_maps(model, images, text_features, method, sliding_window), masks):
                confusion.update(labels_from_scores(scores, dataset.class_names, background_threshold), mask)
        bar.update(min(batch_size, n - first))
    bar.close()
    if len(skipped) == n:
        raise DataError(f"none of the {n} images could be read (first error: {skipped[0]})")
    metrics = confusion.compute(dataset.class_names)
    return {
        "dataset": dataset.name,
        "data": str(data),
        "method": method,
        "num_images": n - len(skipped),
        "skipped_images": len(skipped),
        "background_threshold": background_threshold,
        "sliding_window": sliding_window,
        "templates": list(templates),
        **metrics.to_dict(),
        "seconds": round(time.perf_counter() - start, 3),
    }
