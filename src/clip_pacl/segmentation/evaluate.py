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
from clip_pacl.segmentation.background import resolve_background
from clip_pacl.segmentation.metrics import ConfusionMatrix
from clip_pacl.segmentation.predict import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    default_method,
    labels_from_scores,
    score_maps,
)
from clip_pacl.zeroshot.templates import check_template, read_lines

TEMPLATES_FILE = "templates.txt"


def dataset_templates(data: str | Path) -> list[str]:
    """The prompt templates a dataset directory ships in `templates.txt`, or `DEFAULT_TEMPLATES` without one."""
    path = Path(data) / TEMPLATES_FILE
    if not path.is_file():
        return list(DEFAULT_TEMPLATES)
    return [check_template(t) for t in read_lines(path, what="templates")]


def evaluate_segmentation(
    model: torch.nn.Module,
    data: str | Path,
    method: str | None = None,
    background_threshold: float | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 16,
    sliding_window: bool = False,
    limit: int | None = None,
    progress: bool = False,
    background: str = "auto",
) -> dict:
    """mIoU, pixel accuracy and per-class IoU of `model` on the segmentation dataset at `data`.

    `background` decides which pixels are background without labels ("auto", "zscore", "otsu", "calibrated", "prompt";
    see `clip_pacl.segmentation.background`); a `background_threshold` (a cosine) overrides it. The result's
    "background" entry says which rule was used.
    `templates=None` uses the dataset's own `templates.txt` (one prompt template per line) when it has one,
    else `DEFAULT_TEMPLATES`. Unreadable images are skipped and counted, not fatal.
    """
    setting = background if background_threshold is None else background_threshold
    (result,) = evaluate_segmentation_thresholds(
        model, data, [setting], method=method, templates=templates, batch_size=batch_size,
        sliding_window=sliding_window, limit=limit, progress=progress)
    return result


def evaluate_segmentation_thresholds(
    model: torch.nn.Module,
    data: str | Path,
    background_thresholds: Sequence[float | str | None],
    method: str | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 16,
    sliding_window: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """`evaluate_segmentation` at several background settings at once.

    Each entry is a cosine, a rule name ("auto", "zscore", "otsu", "calibrated", "prompt") or None (no threshold: the
    background prompt competes, the same as "prompt").

    Every image is encoded and scored once; only the labelling differs. One result dict per threshold,
    in the order given, each what `evaluate_segmentation` returns for that threshold.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {batch_size})")
    if not background_thresholds:
        raise ValueError("no background thresholds given")
    dataset = open_segmentation_dataset(data)
    method = method or default_method(model)
    rules = [resolve_background(model, dataset.class_names, "prompt" if t is None else t, method)
             for t in background_thresholds]
    if any(r.name not in ("prompt", "none") for r in rules) and dataset.background_index is None:
        raise DataError(f"a background threshold needs a 'background' class, and the {dataset.name} dataset "
                        "has none")
    if templates is None:
        templates = dataset_templates(data)
    model.eval()
    text_features = class_embeddings(model, dataset.class_names, templates, method)  # (C, D)
    confusions = [ConfusionMatrix(len(dataset.class_names), IGNORE_INDEX) for _ in background_thresholds]
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
                for confusion, rule in zip(confusions, rules):
                    confusion.update(labels_from_scores(scores, dataset.class_names, rule), mask)
        bar.update(min(batch_size, n - first))
    bar.close()
    if len(skipped) == n:
        raise DataError(f"none of the {n} images could be read (first error: {skipped[0]})")
    seconds = round(time.perf_counter() - start, 3)
    return [{
        "dataset": dataset.name,
        "data": str(data),
        "method": method,
        "num_images": n - len(skipped),
        "skipped_images": len(skipped),
        "background_threshold": rule.threshold,
        "background": rule.to_dict(),
        "sliding_window": sliding_window,
        "templates": list(templates),
        **confusion.compute(dataset.class_names).to_dict(),
        "seconds": seconds,
    } for confusion, rule in zip(confusions, rules)]
