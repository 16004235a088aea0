"""Zero-shot classification accuracy: top-1, top-5 and mean per-class recall, as CLIP_benchmark reports them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clip_pacl.encode import score_images
from clip_pacl.errors import DataError
from clip_pacl.zeroshot.classifier import build_classifier


def label_indices(labels: Sequence[str], class_names: Sequence[str] | None) -> tuple[list[str], list[int | None]]:
    """(class names, class index per label or None where the label is not one of the classes).

    Without `class_names`, the classes are the sorted distinct labels. With them, labels match by name,
    or, when every label is an integer, by position (ImageNet-style CSVs store class ids).
    """
    if class_names is None:
        class_names = sorted(set(labels))
        if not class_names:
            raise DataError("no labelled images to evaluate")
    by_name = {name: i for i, name in enumerate(class_names)}
    if any(label in by_name for label in labels) or not all(label.strip().isdigit() for label in labels):
        return list(class_names), [by_name.get(label) for label in labels]
    ids = [int(label) for label in labels]
    out_of_range = [i for i in ids if i >= len(class_names)]
    if out_of_range:
        raise DataError(f"label id {out_of_range[0]} is out of range for {len(class_names)} classes")
    return list(class_names), list(ids)


def unique_keys(names: Sequence[str]) -> list[str]:
    """Class names made unique for use as keys: a repeat gets ` #2`, ` #3` (OpenAI's ImageNet list repeats two)."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return keys


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of class scores (N, C) against target ids (N,).

    Mean per-class recall (balanced accuracy) averages recall over the classes that have images, so a
    skewed test set cannot hide a model that ignores its rare classes.
    """
    n, num_classes = scores.shape
    if n == 0:
        raise DataError("no images to compute classification metrics on")
    k = min(5, num_classes)
    topk = scores.topk(k, dim=1).indices  # (N, k)
    top1_hit = topk[:, 0] == targets  # (N,)
    topk_hit = (topk == targets[:, None]).any(dim=1)  # (N,)
    images_per_class = torch.bincount(targets, minlength=num_classes)  # (C,)
    hits_per_class = torch.bincount(targets, weights=top1_hit.double(), minlength=num_classes)  # (C,)
    per_class = {key: float(hits_per_class[c] / images_per_class[c])
                 for c, key in enumerate(unique_keys(class_names)) if images_per_class[c] > 0}
    return {
        "top1": float(top1_hit.double().mean()),
        "top5": float(topk_hit.double().mean()),
        "top5_k": k,
        "mean_per_class_recall": sum(per_class.values()) / len(per_class),
        "num_images": n,
        "num_classes": num_classes,
        "per_class_recall": per_class,
    }


def evaluate_zeroshot(
    model: torch.nn.Module,
    rows: Sequence[Any],
    templates: Sequence[str],
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    plots: str | Path | None = None,
) -> dict[str, Any]:
    """Classify every image of `rows` (objects with `.image` and `.label`) among the classes, by prompts alone.

    Rows whose label is not among `class_names` are left out and counted (`skipped_rows`): that is how
    `--classes` restricts an evaluation to a subset. Unreadable images are counted and listed. With `plots`
    (a folder), the confusion matrix is drawn there as `confusion_matrix.png`.
    """
    if device is not None:
        model = model.to(device)
    names, targets = label_indices([str(r.label) for r in rows], class_names)
    kept = [(r.image, t) for r, t in zip(rows, targets) if t is not None]
    if not kept:
        raise DataError(f"no image has a label among the {len(names)} classes (e.g. {', '.join(names[:3])})")
    classifier = build_classifier(model, names, templates, batch_size=max(batch_size, 64), progress=progress)
    scores, indices, unreadable = score_images(model, [p for p, _ in kept], classifier, batch_size, workers,
                                               desc="zero-shot", progress=progress)  # (M, C), (M,)
    if not len(indices):
        raise DataError(f"none of the {len(kept)} images could be read (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    target_ids = torch.tensor([kept[i][1] for i in indices.tolist()], dtype=torch.long)
    result = classification_metrics(scores, target_ids, names)
    if plots is not None:
        from clip_pacl.eval.plots import plot_confusion_matrix

        png = plot_confusion_matrix(scores.argmax(dim=1), target_ids, names, Path(plots) / "confusion_matrix.png")
        result["plots"] = [str(png)]
    result.update(
        num_templates=len(templates),
        skipped_rows=len(rows) - len(kept),
        num_unreadable=len(unreadable),
        unreadable=[{"path": p, "reason": r} for p, r in unreadable],
    )
    return result
