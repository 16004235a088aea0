"""Linear-probe accuracy: logistic regression on frozen image features, as the CLIP paper evaluates representations.

The regularisation strength is not tuned on the test set: C is swept on a log scale (the paper swept 1e-6..1e6)
with a held-out part of the training images, then the probe is refit on all of them at the best C. Features
are the model's L2-normalised image embeddings; unreadable images are skipped and counted on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_pacl.encode import encode_images
from clip_pacl.errors import DataError, MissingDependencyError
from clip_pacl.zeroshot.evaluate import classification_metrics

DEFAULT_CS = tuple(float(c) for c in np.logspace(-6, 6, 13))


def encode_labelled(model: torch.nn.Module, rows: Sequence[Any], batch_size: int = 64, workers: int = 0,
                    progress: bool = True) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(features (M, D) float32, labels of the M readable images, unreadable [(path, reason)])."""
    features, kept, unreadable = encode_images(model, [Path(r.image) for r in rows], batch_size, workers, progress)
    return features.numpy(), [str(rows[i].label) for i in kept.tolist()], unreadable


def choose_c(features: np.ndarray, targets: np.ndarray, cs: Sequence[float], val_fraction: float = 0.2,
             seed: int = 0, max_iter: int = 1000) -> tuple[float, dict[float, float]]:
    """(best C, validation accuracy per C) on a stratified split of the training features; ties go to the smaller C
    (the stronger regularisation)."""
    LogisticRegression, train_test_split = _sklearn()
    counts = np.bincount(targets)
    stratify = targets if counts[counts > 0].min() >= 2 else None
    fit_x, val_x, fit_y, val_y = train_test_split(features, targets, test_size=val_fraction, random_state=seed,
                                                  stratify=stratify)
    accuracy = {}
    for c in sorted(cs):
        probe = LogisticRegression(C=c, max_iter=max_iter).fit(fit_x, fit_y)
        accuracy[c] = float((probe.predict(val_x) == val_y).mean())
    best = max(accuracy.values())
    return next(c for c in sorted(cs) if accuracy[c] == best), accuracy


def evaluate_linear_probe(
    model: torch.nn.Module,
    train_rows: Sequence[Any],
    test_rows: Sequence[Any],
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1, top-5 and per-class recall of a logistic-regression probe trained on `train_rows`, tested on
    `test_rows` (objects with `.image` and `.label`). Test rows whose label no training image has are left out
    and counted (`skipped_rows`): a probe cannot predict a class it never saw. `overlap`: the test images that
    are also training images (`shared_images`); any makes the accuracy optimistic."""
    if not cs:
        raise ValueError("no regularisation values C to sweep")
    if not 0 < val_fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    LogisticRegression, _ = _sklearn()
    overlap = shared_images(train_rows, test_rows)
    train_classes = sorted({str(r.label) for r in train_rows})
    if not any(str(r.label) in train_classes for r in test_rows):  # before any encoding: a wrong file or column
        raise DataError(f"no test image has a label among the {len(train_classes)} training classes "
                        f"(e.g. {', '.join(train_classes[:3])})")
    train_x, train_labels, train_bad = encode_labelled(model, train_rows, batch_size, workers, progress)
    class_names = sorted(set(train_labels))
    if len(class_names) < 2:
        raise DataError(f"a linear probe needs at least 2 classes among the readable training images "
                        f"(got {len(class_names)})")
    index = {name: i for i, name in enumerate(class_names)}
    train_y = np.array([index[label] for label in train_labels])
    if len(train_y) < 2 * len(class_names):
        raise DataError(f"{len(train_y)} readable training images are too few for {len(class_names)} classes "
                        "and a validation split")
    best_c, val_accuracy = choose_c(train_x, train_y, cs, val_fraction, seed)
    probe = LogisticRegression(C=best_c, max_iter=1000).fit(train_x, train_y)

    known = [r for r in test_rows if str(r.label) in index]
    if not known:
        raise DataError(f"no test image has a label among the {len(class_names)} classes of the readable "
                        "training images")
    test_x, test_labels, test_bad = encode_labelled(model, known, batch_size, workers, progress)
    if not len(test_labels):
        raise DataError(f"none of the {len(known)} test images could be read (e.g. {test_bad[0][0]}: {test_bad[0][1]})")
    scores = torch.from_numpy(probe.predict_proba(test_x))  # (N, C), columns in class order
    targets = torch.tensor([index[label] for label in test_labels])
    result = classification_metrics(scores, targets, class_names)
    unreadable = train_bad + test_bad
    result.update(
        C=best_c,
        val_accuracy={f"{c:g}": a for c, a in val_accuracy.items()},
        num_train_images=len(train_y),
        overlap=overlap,
        skipped_rows=len(test_rows) - len(known),
        num_unreadable=len(unreadable),
        unreadable=[{"path": p, "reason": r} for p, r in unreadable],
    )
    return result


def shared_images(train_rows: Sequence[Any], test_rows: Sequence[Any]) -> int:
    """How many distinct test images are also training images (the same file, however the paths are written). A
    probe tested on its own training images measures memorisation: the same file as --train and --test gives 100%."""
    train = {Path(r.image).resolve() for r in train_rows}
    return len({Path(r.image).resolve() for r in test_rows} & train)


def _sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise MissingDependencyError("scikit-learn", "eval", "the linear probe") from None
    return LogisticRegression, train_test_split
