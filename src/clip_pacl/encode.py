"""Batched encoding shared by the evaluations, zero-shot classification, the image index and the server.

Evaluations must not die on image 40,001 of 50,000 because one file is corrupt: images that cannot be
read are skipped, counted and reported, and the metrics say how many images they cover.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clip_pacl.data import load_image
from clip_pacl.errors import DataError
from clip_pacl.models.protocol import ContrastiveModel
from clip_pacl.preprocess import model_tokenizer, model_transform


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for the duration, then the mode the model had: validation during training must not
    leave dropout off (or a frozen tower's mode changed) for the steps that follow."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where inputs must go)."""
    return next(model.parameters()).device


def encode_texts(
    model: ContrastiveModel,
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "texts",
) -> torch.Tensor:
    """L2-normalised text features (N, D) of `texts`, `batch_size` at a time, on the model's device.

    Tokenized by the model's own tokenizer; `model.encode_text(tokens, normalize=True)` is the text side of every
    model here (a PACL model returns its text embedder's output), so classifiers and retrieval work for all of them.
    Runs in eval mode under inference_mode, so CLIP takes its towers' exact inference paths (`fast=True`,
    `models/layers.py`).
    """
    if not texts:
        raise DataError("no texts to encode")
    tokenizer = model_tokenizer(model)
    device = model_device(model)
    chunks = []
    with evaluating(model), torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress,
                          leave=False):
            tokens = tokenizer(list(texts[start:start + batch_size]))  # (b, L)
            chunks.append(model.encode_text(tokens.to(device), normalize=True).float())  # (b, D)
    return torch.cat(chunks)  # (N, D)


class _ImageFiles(Dataset):
    """Loads and transforms images by index; an unreadable file yields None instead of raising in a worker."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(load_image(self.paths[index])), None
        except (OSError, ValueError, DataError) as e:  # missing, truncated or not an image at all
            return index, None, " ".join(str(e).split()) or type(e).__name__


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return indices, images, bad


@dataclass
class ImageBatches:
    """Iterates (indices (B,), images (B, 3, H, W)) over readable images, in order, with a progress bar.

    After iteration, `unreadable` holds (path, reason) for every image that was skipped.
    """

    paths: Sequence[Path]
    transform: Callable  # PIL image -> (3, H, W): the model's own (`preprocess.model_transform`)
    batch_size: int = 64
    workers: int = 0
    desc: str = "images"
    progress: bool = True
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        self.unreadable.clear()
        loader = DataLoader(
            _ImageFiles(self.paths, self.transform),
            batch_size=self.batch_size,
            num_workers=self.workers,
            collate_fn=_collate,
        )
        with tqdm(total=len(self.paths), desc=self.desc, unit="img", disable=not self.progress, leave=False) as bar:
            for indices, images, bad in loader:
                self.unreadable += [(str(self.paths[i]), err) for i, err in bad]
                bar.update(len(indices) + len(bad))
                if images is not None:
                    yield indices, images


def encode_images(
    model: ContrastiveModel,
    paths: Sequence[Path],
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(features (M, D) L2-normalised, indices (M,) into `paths`, unreadable [(path, reason)]) on the CPU."""
    batches = ImageBatches(paths, model_transform(model), batch_size, workers, desc="images", progress=progress)
    device = model_device(model)
    features, kept = [], []
    with evaluating(model), torch.inference_mode():
        for indices, images in batches:
            features.append(model.encode_image(images.to(device), normalize=True).float().cpu())  # (B, D)
            kept.append(indices)
    if not features:
        return torch.empty(0, model.embed_dim), torch.empty(0, dtype=torch.long), batches.unreadable
    return torch.cat(features), torch.cat(kept), batches.unreadable


def score_images(
    model: ContrastiveModel,
    paths: Sequence[Path],
    text_features: torch.Tensor,
    batch_size: int = 64,
    workers: int = 0,
    desc: str = "images",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(scores (M, T) on the CPU, indices (M,) into `paths`, unreadable [(path, reason)]) of readable images.

    Scores are `model.similarity(images, text_features)`: cosine for CLIP, phi for PACL.
    """
    batches = ImageBatches(paths, model_transform(model), batch_size, workers, desc=desc, progress=progress)
    device = model_device(model)
    scores, kept = [], []
    with evaluating(model), torch.inference_mode():
        for indices, images in batches:
            scores.append(model.similarity(images.to(device), text_features.to(device)).float().cpu())  # (B, T)
            kept.append(indices)
    if not scores:
        return torch.empty(0, len(text_features)), torch.empty(0, dtype=torch.long), batches.unreadable
    return torch.cat(scores), torch.cat(kept), batches.unreadable
