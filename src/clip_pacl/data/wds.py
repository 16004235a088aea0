"""Webdataset tar shards (`"shards/{000000..000099}.tar"`), streamed: the `[wds]` extra.

Each sample is the tar members sharing a key: an image (`jpg`, `jpeg`, `png` or `webp`) and a
caption (`txt`, or `json` with a `caption` or `text` field). Shards are shuffled per epoch with
a seed, split across DDP ranks then loader workers, and samples are shuffled in a buffer; a
resumed run skips the raw (undecoded) samples of the batches it already trained on, so it sees
exactly the batches the uninterrupted run would have (given the same worker count and world size).
Shards hold different numbers of samples, so ranks may run out at different steps: train DDP runs
on shards for a number of steps (`--steps`) rather than to the end of an epoch.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tarfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clip_pacl.console import human_bytes
from clip_pacl.data.images import decode_image_bytes
from clip_pacl.data.samples import Tokenizer, Transform, mix_seed, seeded_call, tokens_1d
from clip_pacl.errors import DataError, MissingDependencyError

log = logging.getLogger("clip_pacl.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# The largest tar member read into memory (an image, a caption, a json): webdataset images are kilobytes to a few
# megabytes; a member over this is left unread and its sample counted unreadable.
MAX_MEMBER_BYTES = 64 * 2**20
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise MissingDependencyError("webdataset", "wds", "reading webdataset shards") from None
    return webdataset


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(pattern: str) -> list[str]:
    """Shard URLs from a brace pattern (`a/{000..009}.tar`, `::`-joined lists) or a folder of `.tar` files.

    Local shards must all exist: a typo in a pattern should fail now, not after an hour of training.
    """
    if Path(pattern).is_dir():
        shards = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not shards:
            raise DataError(f"{pattern} has no .tar shards")
        return shards
    shards = _webdataset().shardlists.expand_urls(pattern)
    missing = [s for s in shards if _is_local(s) and not Path(s).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(shards)} shards do not exist (first: {missing[0]})")
    return shards


def _shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def _caption(sample: dict[str, Any]) -> str | None:
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace")
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        text = meta.get("caption") or meta.get("text") if isinstance(meta, dict) else meta
    else:
        return None
    return text.strip() or None if isinstance(text, str) else None


class WdsCaptionDataset(IterableDataset):
    """Streams (image (3, H, W), tokens (L,)) or None per sample of a list of shards."""

    def __init__(self, shards: list[str], transform: Transform, tokenizer: Tokenizer, *, shuffle_buffer: int = 2000,
                 num_samples: int | None = None):
        self.shards = list(shards)
        self.transform = transform
        self.tokenizer = tokenizer
        self.shuffle_buffer = shuffle_buffer
        self.num_samples = num_samples
        self.seed, self.epoch, self.shuffle, self.batch_size, self.start_batch = 0, 0, False, 1, 0
        self.rank, self.world_size = 0, 1

    def configure(self, *, seed: int, epoch: int, shuffle: bool, batch_size: int, start_batch: int, rank: int,
                  world_size: int, workers: int) -> int:
        """Called by build_loader; returns how many workers can be used (no more than shards per rank)."""
        if len(self.shards) < world_size:
            raise DataError(f"{len(self.shards)} shards cannot be split across {world_size} ranks; write more shards")
        self.seed, self.shuffle, self.batch_size = seed, shuffle, batch_size
        self.rank, self.world_size = rank, world_size
        self.set_epoch(epoch, start_batch)
        return min(workers, len(self.shards) // world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Samples for this rank (the loader's len() is then approximate with several workers)."""
        if self.num_samples is None:
            if not all(_is_local(s) for s in self.shards):
                raise TypeError("remote webdataset shards have no length; pass num_samples")
            self.num_samples = sum(_count_samples(Path(s)) for s in self.shards)
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        info = get_worker_info()
        n_workers = info.num_workers if info is not None else 1
        # The loader takes batches from workers in turn, starting at worker 0, and global batch b comes from
        # worker b % n_workers: a run resumed at start_batch rotates the roles so the sequence continues.
        worker = ((info.id if info is not None else 0) + self.start_batch) % n_workers
        shards = list(self.shards)
        if self.shuffle:
            random.Random(mix_seed(self.seed, self.epoch)).shuffle(shards)
        mine = shards[self.rank :: self.world_size][worker::n_workers]
        handler = _webdataset().warn_and_continue
        samples: Iterator[dict[str, Any]] = iter(
            _webdataset().tariterators.tarfile_samples(({"url": url} for url in mine), handler=handler))
        if self.shuffle:
            rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, worker))
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        done = max(self.start_batch - worker + n_workers - 1, 0) // n_workers
        for sample in islice(samples, done * self.batch_size, None):
            yield self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        caption = _caption(sample)
        if image_key is None or caption is None:
            log.warning("skipping %s: no %s", name, "image" if image_key is None else "caption")
            return None
        try:
            image = decode_image_bytes(sample[image_key], f"{name}.{image_key}")
        except DataError as e:
            log.warning("skipping: %s", e)
            return None
        pixels = seeded_call(self.transform, image, mix_seed(self.seed, self.epoch, name))  # (3, H, W)
        return pixels, tokens_1d(self.tokenizer, caption)


def split_member(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member's name, by webdataset's rule: the key ends at the basename's first
    dot (`a/b.seg.png` -> (`a/b`, `seg.png`)); None for a name without one."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _count_samples(shard: Path) -> int:
    """Samples with an image in one tar, reading only the headers."""
    keys = set()
    with tarfile.open(shard) as tar:
        for member in tar:
            split = split_member(member.name)
            if member.isfile() and split and split[1] in IMAGE_KEYS:
                keys.add(split[0])
    return len(keys)


class TarSample(NamedTuple):
    """One sample of a shard: its key, its members' bytes by extension, and the sizes of members left unread
    because they exceed the per-member limit."""

    key: str
    members: dict[str, bytes]
    oversized: dict[str, int]


def tar_samples(shard: str | Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[TarSample]:
    """Each sample of a local tar shard, in tar order, streamed (webdataset's grouping: consecutive members that
    share a key). A member is read only when its size is at most `max_member_bytes`, and never past it; larger
    ones are skipped unread (listed in `oversized`). Raises tarfile.TarError or OSError on a damaged tar."""
    sample = None
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            split = split_member(member.name) if member.isfile() else None
            if split is None:
                continue
            if sample is not None and split[0] != sample.key:
                yield sample
                sample = None
            if sample is None:
                sample = TarSample(split[0], {}, {})
            if member.size > max_member_bytes:
                sample.oversized[split[1]] = member.size
                continue
            data = tar.extractfile(member).read(max_member_bytes + 1)
            if len(data) > max_member_bytes:  # a header that understates its member
                raise tarfile.TarError(f"member {member.name} holds more than its header says")
            sample.members[split[1]] = data
    if sample is not None:
        yield sample


def oversized_reason(name: str, ext: str, size: int, limit: int = MAX_MEMBER_BYTES) -> str:
    return f"{name}.{ext} is {human_bytes(size)}, over the {human_bytes(limit)} limit for one tar member"


def build_wds_datasets(pattern: str, *, transform: Transform, tokenizer: Tokenizer, val_fraction: float = 0.0,
                       val_transform: Transform | None = None) -> tuple[WdsCaptionDataset, WdsCaptionDataset | None]:
    """(train, validation or None): validation is the last `val_fraction` of the shards, whole shards only."""
    shards = expand_shards(pattern)
    if val_fraction <= 0:
        return WdsCaptionDataset(shards, transform, tokenizer), None
    n_val = max(1, round(len(shards) * val_fraction))
    if n_val >= len(shards):
        raise DataError(f"{len(shards)} shard(s) cannot be split into training and validation; write more shards")
    return (WdsCaptionDataset(shards[:-n_val], transform, tokenizer),
            WdsCaptionDataset(shards[-n_val:], val_transform or transform, tokenizer))
