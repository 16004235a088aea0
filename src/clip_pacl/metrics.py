"""CLIPScore and RefCLIPScore (Hessel et al. 2021): how well a caption fits an image, by a CLIP.

CLIP-S(c, v) = w * max(cos(c, v), 0), w = 2.5 (the paper's rescaling, which spreads the scores over about
[0, 1] for ViT-B/32; torchmetrics reports the same quantity with w = 100). RefCLIP-S adds human references R:
the harmonic mean of CLIP-S(c, v) and max(max_r cos(c, r), 0), as the paper's equation and its reference code
(jmhessel/clipscore) define it (no w on the text-text term). The paper also prefixes every caption with
"A photo depicts"; that is `prefix` here, off by default as in torchmetrics.

Scores come from `model.similarity`, so a PACL model is scored by its compatibility, like everywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clip_pacl.encode import ImageBatches, encode_texts, evaluating, model_device
from clip_pacl.errors import DataError
from clip_pacl.preprocess import model_transform, normalize_pixels

W = 2.5

ImageInput = Sequence[str | Path | Image.Image] | torch.Tensor


def clip_s(cosine: torch.Tensor, w: float = W) -> torch.Tensor:
    """CLIP-S from image-caption cosines (any shape): w * max(cos, 0)."""
    return w * cosine.clamp(min=0)


def ref_clip_s(clip_scores: torch.Tensor, caption_features: torch.Tensor,
               reference_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """RefCLIP-S (N,) from CLIP-S (N,), normalised caption features (N, D) and each caption's normalised
    reference features [(R_i, D)]: the harmonic mean of CLIP-S and max(max_r cos(c, r), 0); 0 where both are 0."""
    if len(reference_features) != len(caption_features):
        raise ValueError(f"{len(caption_features)} captions but {len(reference_features)} reference lists")
    if any(len(r) == 0 for r in reference_features):
        raise DataError("every caption needs at least one reference for RefCLIPScore")
    text_text = torch.stack([(refs @ c).max() for c, refs in zip(caption_features, reference_features)]).clamp(min=0)
    total = clip_scores + text_text
    return torch.where(total > 0, 2 * clip_scores * text_text / total.clamp(min=1e-12), torch.zeros_like(total))


@dataclass
class CLIPScores:
    """Per-pair scores of the pairs whose image could be read (`pairs` indexes the input), and the means."""

    pairs: torch.Tensor  # (M,) indices into the input pairs
    clip_score: torch.Tensor  # (M,)
    ref_clip_score: torch.Tensor | None = None  # (M,) when references were given
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of skipped images

    def summary(self) -> dict[str, Any]:
        """The means and counts, as `clip-pacl score --json` prints them."""
        out: dict[str, Any] = {"clip_score": float(self.clip_score.double().mean()), "num_pairs": len(self.pairs)}
        if self.ref_clip_score is not None:
            out["ref_clip_score"] = float(self.ref_clip_score.double().mean())
        out.update(num_unreadable=len(self.unreadable),
                   unreadable=[{"path": p, "reason": r} for p, r in self.unreadable])
        return out


def clip_score(
    model: torch.nn.Module,
    images: ImageInput,
    captions: Sequence[str],
    references: Sequence[Sequence[str]] | None = None,
    *,
    w: float = W,
    prefix: str = "",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> CLIPScores:
    """CLIPScore of each (image, caption) pair, and RefCLIPScore when each pair has `references`.

    `images`: one per caption, as paths (pairs may share a path; each file is read once, unreadable ones are
    skipped and listed), PIL images, or a float tensor (N, 3, S, S) of pixels in [0, 1] at the model's input
    size (a generator's output; the model's normalisation is applied here).
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: CLIPScore scores pairs")
    if not len(captions):
        raise DataError("no (image, caption) pairs to score")
    if references is not None and len(references) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists")
    text = encode_texts(model, [_prefixed(prefix, c) for c in captions], max(batch_size, 64), progress=progress,
                        desc="captions")  # (N, D)
    sources, owner = _unique_images(images)
    pairs_of = [[] for _ in sources]
    for pair, image in enumerate(owner):
        pairs_of[image].append(pair)
    device = model_device(model)
    kept, cosines = [], []
    batches = _pixel_batches(model, images, sources, batch_size, workers, progress)
    with evaluating(model), torch.inference_mode():
        for indices, pixels in batches:
            pairs = [p for i in indices.tolist() for p in pairs_of[i]]
            row_of = {image: row for row, image in enumerate(indices.tolist())}
            rows = torch.tensor([row_of[owner[p]] for p in pairs])  # each pair's image in this batch
            sims = model.similarity(pixels.to(device), text[pairs].to(device)).float().cpu()  # (B, P)
            cosines.append(sims[rows, torch.arange(len(pairs))])  # (P,)
            kept += pairs
    unreadable = getattr(batches, "unreadable", [])
    if not kept:
        raise DataError(f"none of the {len(sources)} images could be read "
                        f"(e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    order = torch.tensor(kept).argsort()  # input order
    pairs, scores = torch.tensor(kept)[order], clip_s(torch.cat(cosines)[order], w)
    result = CLIPScores(pairs, scores, unreadable=list(unreadable))
    if references is not None:
        flat = [_prefixed(prefix, r) for p in pairs.tolist() for r in references[p]]
        if not flat:
            raise DataError("no reference captions given for RefCLIPScore")
        ref_features = encode_texts(model, flat, max(batch_size, 64), progress=progress, desc="references")
        sizes = [len(references[p]) for p in pairs.tolist()]
        result.ref_clip_score = ref_clip_s(scores, text[pairs], list(ref_features.split(sizes)))
    return result


def _prefixed(prefix: str, caption: str) -> str:
    return f"{prefix.rstrip()} {caption}" if prefix.strip() else caption


def _unique_images(images: ImageInput) -> tuple[list[Any], list[int]]:
    """(distinct images, each pair's index into them): paths are compared absolute and normalised."""
    if isinstance(images, torch.Tensor) or not all(isinstance(i, (str, Path)) for i in images):
        return list(range(len(images))), list(range(len(images)))
    index: dict[Path, int] = {}
    owner = [index.setdefault(Path(os.path.abspath(p)), len(index)) for p in images]
    return list(index), owner


def _pixel_batches(model: torch.nn.Module, images: ImageInput, sources: list[Any], batch_size: int, workers: int,
                   progress: bool) -> ImageBatches | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices into `sources` (B,), normalised pixels (B, 3, S, S)) batches."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be (N, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (model.image_size, model.image_size):
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but the model takes "
                             f"{model.image_size}x{model.image_size}: resize them first")
        return ((torch.arange(s, min(s + batch_size, len(images))), normalize_pixels(model, images[s:s + batch_size]))
                for s in range(0, len(images), batch_size))
    if isinstance(sources[0], Path):
        return ImageBatches(sources, model_transform(model), batch_size, workers, desc="images", progress=progress)
    transform = model_transform(model)
    return ((torch.arange(s, min(s + batch_size, len(images))),
             torch.stack([transform(im) for im in images[s:s + batch_size]]))
            for s in range(0, len(images), batch_size))
