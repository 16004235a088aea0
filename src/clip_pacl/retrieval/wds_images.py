"""Webdataset shards as index input (`index build --images 'shards/{000000..000099}.tar'`).

Every sample with an image member (`jpg`, `jpeg`, `png`, `webp`) becomes one indexed image named `SHARD#KEY`
(the shard's absolute path, the sample's key), in shard order and then tar order. Its `txt` member becomes
the `caption` of its metadata and the fields of its `json` member (an object) join it, as a table's columns do.
Every row records its shard's size and mtime. Samples without an image, or whose image does not decode, are
unreadable (counted and reported); a damaged tar keeps the samples read before the damage and counts the
shard itself as unreadable. Shards are read with `tarfile`, so local shards only (no URLs, no `pipe:`): an
index names images it can show again (the web server's thumbnails read them back by key).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from clip_pacl.data.formats import is_wds_pattern
from clip_pacl.data.images import IMAGE_EXTENSIONS, decode_image_bytes
from clip_pacl.data.wds import IMAGE_KEYS, TarSample, expand_shards, oversized_reason, tar_samples
from clip_pacl.encode import evaluating, model_device
from clip_pacl.errors import DataError
from clip_pacl.preprocess import model_transform
from clip_pacl.retrieval.build import file_stat
from clip_pacl.retrieval.sharded import Part

SEPARATOR = "#"


def wds_shards(source: str | Path) -> list[str] | None:
    """The absolute shard paths when `source` names webdataset shards (a `{a..b}` pattern, a `.tar`, `::`-joined
    shards, or a folder holding `.tar` files and no images); None when it is a folder of images or a table."""
    text = str(source)
    folder = Path(text)
    if folder.is_dir():
        if not any(folder.glob("*.tar")) or any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")):
            return None
    elif not is_wds_pattern(text):
        return None
    if "://" in text or text.startswith("pipe:"):
        raise DataError(f"{text}: an index reads local webdataset shards only (download them first)")
    return [os.path.abspath(shard) for shard in expand_shards(text)]


def wds_source(source: str | Path) -> str:
    """The shard pattern as recorded in meta.json: every part absolute, so `index update` works from anywhere."""
    return "::".join(os.path.abspath(part) for part in str(source).split("::"))


def sample_metadata(members: dict[str, bytes]) -> dict[str, Any]:
    """A sample's `txt` as `caption`, plus the fields of its `json` member when that is an object."""
    metadata: dict[str, Any] = {}
    if "txt" in members:
        metadata["caption"] = members["txt"].decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            fields = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            fields = None
        if isinstance(fields, dict):
            metadata.update(fields)
    return metadata


class _ShardImages(IterableDataset):
    """Yields (order (shard, sample), name, pixels (3, H, W) or None, reason or None, metadata) per sample;
    loader workers take every n-th shard."""

    def __init__(self, shards: Sequence[str], transform):
        self.shards = list(shards)
        self.transform = transform

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in range(worker, len(self.shards), n_workers):
            shard, j = self.shards[s], -1
            try:
                for j, sample in enumerate(tar_samples(shard)):
                    yield self._sample((s, j), f"{shard}{SEPARATOR}{sample.key}", sample)
            except (tarfile.TarError, OSError, EOFError) as e:
                yield (s, j + 1), shard, None, f"damaged tar after {j + 1} samples ({e})", None

    def _sample(self, order: tuple[int, int], name: str, sample: TarSample) -> tuple:
        members = sample.members
        if sample.oversized:
            ext, size = next(iter(sample.oversized.items()))
            return order, name, None, oversized_reason(name, ext, size), None
        image_key = next((k for k in IMAGE_KEYS if k in members), None)
        if image_key is None:
            return order, name, None, f"no image member ({', '.join(IMAGE_KEYS)})", None
        try:
            pixels = self.transform(decode_image_bytes(members[image_key], f"{name}.{image_key}"))
        except DataError as e:
            return order, name, None, " ".join(str(e).split()), None
        return order, name, pixels, None, sample_metadata(members)


def embed_shards(model: torch.nn.Module, shards: Sequence[str], batch_size: int = 64, workers: int = 0,
                 progress: bool = True) -> Part:
    """The Part of every sample of `shards` (possibly none), in shard and tar order; a repeated name once."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    loader = DataLoader(_ShardImages(shards, model_transform(model)), batch_size=batch_size,
                        num_workers=min(workers, len(shards)), collate_fn=list)
    device, rows, unreadable = model_device(model), [], []
    with evaluating(model), torch.inference_mode(), tqdm(desc="samples", unit="img", disable=not progress,
                                                          leave=False) as bar:
        for batch in loader:
            good = [item for item in batch if item[2] is not None]
            unreadable += [(item[0], item[1], item[3]) for item in batch if item[2] is None]
            if good:
                pixels = torch.stack([item[2] for item in good]).to(device)  # (B, 3, H, W)
                features = model.encode_image(pixels, normalize=True).float().cpu()  # (B, D)
                rows += [(item[0], item[1], item[4], feature) for item, feature in zip(good, features)]
            bar.update(len(batch))
    rows.sort(key=lambda row: row[0])  # workers interleave their shards' batches
    first = {}
    for row in rows:
        first.setdefault(row[1], row)
    rows = list(first.values())
    stats = [file_stat(Path(shard)) for shard in shards]
    embeddings = torch.stack([row[3] for row in rows]) if rows else torch.empty(0, model.embed_dim)  # (M, D)
    return Part(embeddings, [row[1] for row in rows], [stats[row[0][0]] for row in rows],
                [(name, reason) for _, name, reason in sorted(unreadable)], [row[2] for row in rows])


def read_sample_image(name: str) -> Image.Image:
    """The image of an indexed sample `SHARD#KEY`, read back from its tar (for thumbnails)."""
    shard, _, key = name.rpartition(SEPARATOR)
    if not shard:
        raise DataError(f"{name} does not name a webdataset sample (SHARD#KEY)")
    try:
        for sample in tar_samples(shard):
            if sample.key == key:
                image_key = next((k for k in IMAGE_KEYS if k in sample.members), None)
                if image_key is not None:
                    return decode_image_bytes(sample.members[image_key], f"{name}.{image_key}")
                big = next((k for k in IMAGE_KEYS if k in sample.oversized), None)
                if big is not None:
                    raise DataError(oversized_reason(name, big, sample.oversized[big]))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {shard} ({e})") from None
    raise DataError(f"{shard} has no image for sample {key}")
