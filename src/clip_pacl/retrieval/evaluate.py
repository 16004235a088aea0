"""Image-text retrieval recall@k, exact, with several captions per image (COCO, Flickr30k protocol).

Image-to-text: an image scores a hit at k when its best caption scores at least as high as its k-th best text.
Text-to-image: a caption scores a hit at k when its own image scores at least as high as its k-th best image.
Ties count as hits, the same way in both directions (see `recall_from_scores`).
Scores come from `model.similarity`, so PACL's compatibility is evaluated the same way as CLIP's cosine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clip_pacl.encode import encode_texts, score_images
from clip_pacl.errors import DataError

DEFAULT_KS = (1, 5, 10)


def recall_from_scores(
    scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@k both ways from a score matrix (N_images, N_texts) and each text's image index (N_texts,).

    A query is a hit at k when its true candidate scores at least as high as its k-th best candidate: a tie at the
    k-th place counts as a hit, in both directions, so the result never depends on how ties happen to be ordered
    (identical captions score exactly alike) nor on which other k are asked for. Image-to-text, the true score is
    the best of the image's own captions. Without ties this is the usual rank-based recall (CLIP_benchmark's);
    with ties it is the optimistic count (CLIP_benchmark's `topk` breaks them arbitrarily). k is capped at the
    number of candidates. Returns `image_to_text_R@k`, `text_to_image_R@k` and `mean_recall` (their mean).
    """
    n_images, n_texts = scores.shape
    if n_images == 0 or n_texts == 0:
        raise DataError("retrieval needs at least one image and one caption")
    if not ks or min(ks) < 1:
        raise ValueError(f"recall@k needs each k >= 1 (got {tuple(ks)})")
    text_to_image = text_to_image.to(scores.device)
    own = scores[text_to_image, torch.arange(n_texts, device=scores.device)]  # (N_texts,) each text vs its image
    best_own = torch.full((n_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best_own.scatter_reduce_(0, text_to_image, own, reduce="amax")  # (N_images,) each image's best own caption
    k_max = max(ks)
    # the k-th best score is the same whatever order topk gives tied candidates in
    text_kth = scores.topk(min(k_max, n_texts), dim=1).values  # (N_images, k) best text scores per image
    image_kth = scores.topk(min(k_max, n_images), dim=0).values  # (k, N_texts) best image scores per text
    result: dict[str, float] = {}
    for k in ks:
        kth = text_kth[:, min(k, n_texts) - 1]
        result[f"image_to_text_R@{k}"] = float((best_own >= kth).double().mean())
    for k in ks:
        kth = image_kth[min(k, n_images) - 1]
        result[f"text_to_image_R@{k}"] = float((own >= kth).double().mean())
    result["mean_recall"] = sum(result.values()) / len(result)
    return result


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image_index: torch.Tensor | Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@k from normalised image features (N_images, D) and text features (N_texts, D) by cosine.

    The pure form for callers that already hold features, such as periodic validation during training.
    """
    text_to_image = torch.as_tensor(text_to_image_index, dtype=torch.long)
    if len(text_to_image) != len(text_features):
        raise ValueError(f"{len(text_features)} text features but {len(text_to_image)} text-to-image indices")
    return recall_from_scores(image_features.float() @ text_features.float().T, text_to_image, ks)


def group_captions(rows: Sequence[Any]) -> tuple[list[Path], list[str], list[int]]:
    """(unique images in first-seen order, captions, each caption's image index) from (image, caption) rows.

    Paths are compared absolute and normalised, so `a.jpg` and `x/../a.jpg` are one image with two captions.
    """
    image_index: dict[Path, int] = {}
    captions, text_to_image = [], []
    for row in rows:
        captions.append(row.caption)
        text_to_image.append(image_index.setdefault(Path(os.path.abspath(row.image)), len(image_index)))
    return list(image_index), captions, text_to_image


def evaluate_retrieval(
    model: torch.nn.Module,
    rows: Sequence[Any],
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = True,
    plots: str | Path | None = None,
) -> dict[str, Any]:
    """Retrieval recall of `model` on (image, caption) rows; each unique image is encoded once.

    Holds the full (N_images, N_texts) score matrix on the CPU: 0.5 GB for COCO's 5k test images.
    Images that cannot be read are left out with their captions, and counted. With `plots` (a folder), the
    first captions' top-5 images are drawn there as `retrieval_grid.png`.
    """
    if device is not None:
        model = model.to(device)
    images, captions, text_to_image = group_captions(rows)
    if not images:
        raise DataError("no (image, caption) rows to evaluate")
    text_features = encode_texts(model, captions, max(batch_size, 64), progress=progress, desc="captions")  # (T, D)
    scores, kept_images, unreadable = score_images(model, images, text_features, batch_size, workers,
                                                   desc="retrieval", progress=progress)  # (M, T), (M,)
    if not len(kept_images):
        raise DataError(f"none of the {len(images)} images could be read (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    # renumber images 0..M-1 and keep only captions whose image was readable
    new_index = torch.full((len(images),), -1, dtype=torch.long)
    new_index[kept_images] = torch.arange(len(kept_images))
    text_target = new_index[torch.tensor(text_to_image, dtype=torch.long)]  # (T,)
    text_kept = text_target >= 0
    result: dict[str, Any] = recall_from_scores(scores[:, text_kept], text_target[text_kept], ks)
    if plots is not None:
        result["plots"] = [str(_draw_grid(scores, text_target, captions, [images[i] for i in kept_images], plots))]
    result.update(
        num_images=len(kept_images),
        num_captions=int(text_kept.sum()),
        num_unreadable=len(unreadable),
        unreadable=[{"path": p, "reason": r} for p, r in unreadable],
    )
    return result


def _draw_grid(scores: torch.Tensor, text_target: torch.Tensor, captions: Sequence[str], images: Sequence[Path],
               plots: str | Path, queries: int = 8, k: int = 5) -> Path:
    """The first `queries` captions whose image was readable, each with its top-k images (hits marked)."""
    from clip_pacl.eval.plots import plot_retrieval_grid

    shown = [t for t in range(len(captions)) if text_target[t] >= 0][:queries]
    top = scores[:, shown].topk(min(k, len(images)), dim=0).indices.T  # (Q, k)
    return plot_retrieval_grid([captions[t] for t in shown], [[images[i] for i in row] for row in top.tolist()],
                               [[i == int(text_target[t]) for i in row] for t, row in zip(shown, top.tolist())],
                               Path(plots) / "retrieval_grid.png")
