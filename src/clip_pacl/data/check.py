"""Check a caption dataset before training on it: every image decoded once, problems listed with their paths.

A training run skips unreadable images and stops when too many fail; this finds them up front, in
seconds for a few thousand images, instead of an hour into a run.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from clip_pacl.data.formats import read_caption_rows, resolve_data_path
from clip_pacl.data.images import load_image
from clip_pacl.errors import DataError

MAX_EXAMPLES = 10


@dataclass
class DataReport:
    """What `clip-pacl data check` found in a caption dataset: its size, unreadable images, caption
    statistics and the first problems, one sentence each (`to_dict` for --json)."""

    source: str
    format: str
    rows: int  # (image, caption) pairs; for webdataset shards, samples
    images: int  # distinct images checked
    bad_images: int
    captions_per_image: float
    mean_caption_words: float
    problems: list[str] = field(default_factory=list)  # the first MAX_EXAMPLES, one sentence each

    @property
    def bad_fraction(self) -> float:
        return self.bad_images / self.images if self.images else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "bad_fraction": round(self.bad_fraction, 6)}


def _problem(path: Path) -> str | None:
    try:
        load_image(path)
    except DataError as e:
        return str(e)
    return None


def check_caption_data(path: str | Path, *, data_format: str | None = None, image_key: str = "image",
                       caption_key: str = "caption", images_dir: str | Path | None = None, limit: int | None = None,
                       threads: int = 4, seed: int = 0, progress: bool = False) -> DataReport:
    """Read the rows (format and column errors raise here) and decode every distinct image (or `limit` of
    them, drawn at random with `seed`); decoding runs on `threads` threads, as Pillow releases the GIL."""
    source, fmt = resolve_data_path(path, data_format)
    if fmt == "wds":
        return _check_shards(str(source), limit, progress)
    rows = read_caption_rows(source, data_format=fmt, image_key=image_key, caption_key=caption_key,
                             images_dir=images_dir)
    images = list(dict.fromkeys(row.image for row in rows))
    checked = images if limit is None or limit >= len(images) else random.Random(seed).sample(images, limit)
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        results = list(tqdm(pool.map(_problem, checked), total=len(checked), desc="checking", unit="img",
                            disable=not progress))
    problems = [p for p in results if p is not None]
    return DataReport(
        source=str(source), format=fmt, rows=len(rows), images=len(checked), bad_images=len(problems),
        captions_per_image=round(len(rows) / len(images), 3),
        mean_caption_words=round(sum(len(r.caption.split()) for r in rows) / len(rows), 2),
        problems=problems[:MAX_EXAMPLES],
    )


def _check_shards(pattern: str, limit: int | None, progress: bool) -> DataReport:
    from clip_pacl.data.wds import build_wds_datasets

    captions: list[str] = []

    def keep_caption(text: str) -> torch.Tensor:
        captions.append(text)
        return torch.zeros(1)

    dataset, _ = build_wds_datasets(pattern, transform=lambda image: torch.zeros(1), tokenizer=keep_caption)
    samples: Iterable = iter(dataset)
    n = bad = 0
    for item in tqdm(samples, desc="checking", unit="sample", disable=not progress):
        n += 1
        bad += item is None
        if limit is not None and n >= limit:
            break
    problems = [f"{bad} samples have an unreadable image or no caption (their keys are logged above)"] if bad else []
    return DataReport(source=pattern, format="wds", rows=n, images=n, bad_images=bad, captions_per_image=1.0,
                      mean_caption_words=round(sum(len(c.split()) for c in captions) / max(len(captions), 1), 2),
                      problems=problems)
