"""Image-text retrieval recall@k, exact, with several captions per image (COCO, Flickr30k protocol).

Image-to-text: an image scores a hit at k when any of its captions is among its k best texts.
Text-to-image: a caption scores a hit at k when its own image is among its k best images.
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

    k is capped at the number of candidates. Ties are broken by `topk`, as CLIP_benchmark does.
    Returns `image_to_text_R@k`, `text_to_image_R@k` and `mean_recall` (the mean of all of them).
    """
    n_images, n_texts = scores.shape
    if n_images == 0 or n_texts == 0:
        raise DataError("retrieval needs at least one image and one caption")
    text_to_image = text_to_image.to(scores.device)
    k_max = max(ks)
    result: dict[str, float] = {}
    # image -> text: top texts of each image, a hit if any of them belongs to the image
    top_texts = scores.topk(min(k_max, n_texts), dim=1).indices  # (N_images, k)
    owns = text_to_image[top_texts] == torch.arange(n_images, device=scores.device)[:, None]  # (N_images, k)
    for k in ks:
        result[f"image_to_text_R@{k}"] = float(owns[:, :k].any(dim=1).double().mean())
    # text -> image: top images of each text, a hit if its own image is among them
    top_images = scores.topk(min(k_max, n_images), dim=0).indices  # (k, N_texts)
    found = top_images == text_to_image[None, :]  # (k, N_texts)
    for k in ks:
        result[f"text_to_image_R@{k}"] = float(found[:k].any(dim=0).double().mean())
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
