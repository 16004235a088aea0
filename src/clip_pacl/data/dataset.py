"""Caption datasets and the loader that feeds training: bad images skipped and counted, order seeded, resumable.

Reproducibility without giving up workers: the sampler yields `(index, sample_seed)` pairs, and
the dataset seeds the transform's random augmentation from `sample_seed` (seed, epoch, index).
So the pixels of every batch depend only on (seed, epoch, batch position), not on the number of
workers or on whether the run was resumed, and workers can stay alive across epochs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from clip_pacl.data.batch import FeatureBatch, TokenBatch
from clip_pacl.data.formats import read_caption_rows, resolve_data_path
from clip_pacl.data.images import load_image
from clip_pacl.data.rows import CaptionRow, split_by_image
from clip_pacl.data.samples import Tokenizer, Transform, mix_seed, seeded_call, tokens_1d
from clip_pacl.errors import DataError

log = logging.getLogger("clip_pacl.data")
MAX_AUTO_WORKERS = 4  # the default's cap: a few processes decode JPEGs for one CPU step; more mostly take memory
STAT_THREADS = 16  # existence checks in flight at once (a network file system answers many in parallel)


def default_workers() -> int:
    """The data-loading processes a run gets unless told: one per CPU this process may use, less one for the
    training step itself, at most MAX_AUTO_WORKERS (0 on a single CPU, and in a daemonic process such as a
    multiprocessing pool's worker, which may not start children: loading in the main process)."""
    import multiprocessing

    if multiprocessing.current_process().daemon:  # a pool's worker may not start processes of its own
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus - 1))


class CaptionDataset(Dataset):
    """(image (3, H, W), tokens (L,)) per row, or None when the image cannot be read; batched as `TokenBatch`.

    Index with an int, or with an `(index, sample_seed)` pair (what `build_loader`'s sampler yields)
    to make the random augmentation of that item reproducible.
    """

    def __init__(self, rows: Sequence[CaptionRow], transform: Transform, tokenizer: Tokenizer):
        self.rows = list(rows)
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        row = self.rows[index]
        try:
            image = load_image(row.image)
        except DataError as e:
            log.warning("skipping: %s", e)
            return None
        pixels = seeded_call(self.transform, image, sample_seed)  # (3, H, W)
        return pixels, tokens_1d(self.tokenizer, row.caption)


def collate_skip_bad(batch: list[tuple[torch.Tensor, torch.Tensor] | None],
                     batch_type: type[TokenBatch | FeatureBatch] = TokenBatch) -> TokenBatch | FeatureBatch:
    """Stack the good items into a `batch_type` (the dataset's); its `n_bad` / `n_total` let the training loop stop
    when too many images fail.

    A batch in which every image failed has length 0; the loop should skip it.
    """
    good = [item for item in batch if item is not None]
    return batch_type.collate(good, n_bad=len(batch) - len(good))


class EpochSampler(Sampler):
    """Seeded order per epoch, split across DDP ranks, able to start mid-epoch at a batch.

    Yields `(index, sample_seed)`. `set_epoch(e, start_batch)` selects what the next iteration
    yields: epoch e's permutation from batch `start_batch` on (a resumed run passes the batch it
    stopped at; later epochs start at 0). Each rank gets every world_size-th index of the same
    permutation, trimmed so that all ranks run the same number of steps.
    """

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _rank_indices(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=generator)  # (n,)
        else:
            order = torch.arange(self.n)
        usable = self.n - self.n % self.world_size
        return order[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._rank_indices()[self.start_batch * self.batch_size :].tolist():
            yield index, mix_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(self.n // self.world_size - self.start_batch * self.batch_size, 0)


def build_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, workers: int, seed: int, drop_last: bool,
                 epoch: int = 0, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader whose order is a function of (seed, epoch), starting at `start_batch` of `epoch`.

    For the next epoch either build a new loader or call `set_loader_epoch(loader, epoch + 1)` and
    iterate again (map-style datasets keep their workers alive between epochs). `rank`/`world_size`
    shard the data for DDP.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1 (got {batch_size})")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more (got {workers})")
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": workers,
        "collate_fn": partial(collate_skip_bad, batch_type=getattr(dataset, "batch_type", TokenBatch)),
        "pin_memory": torch.cuda.is_available(),
        "drop_last": drop_last,
        # The loader draws its workers' base seed from this, not from the caller's global RNG stream.
        "generator": torch.Generator().manual_seed(mix_seed(seed, "loader")),
    }
    if workers > 0:
        common["prefetch_factor"] = 4
    if isinstance(dataset, IterableDataset):
        configure = getattr(dataset, "configure", None)
        if configure is None:
            raise TypeError(f"{type(dataset).__name__} is iterable but has no configure(); cannot seed or resume it")
        workers = configure(seed=seed, epoch=epoch, shuffle=shuffle, batch_size=batch_size, start_batch=start_batch,
                            rank=rank, world_size=world_size, workers=workers)
        common["num_workers"] = workers
        if workers == 0:
            common.pop("prefetch_factor", None)
        # Not persistent: each epoch's iteration must ship the re-configured dataset to fresh workers.
        return DataLoader(dataset, **common)
    sampler = EpochSampler(len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank,
                           world_size=world_size)
    sampler.set_epoch(epoch, start_batch)
    # a worker loads whole batches: more workers than an epoch has batches would only sit idle
    workers = min(workers, max(1, -(-len(dataset) // (batch_size * world_size))))
    common["num_workers"] = workers
    if workers == 0:
        common.pop("prefetch_factor", None)
    return DataLoader(dataset, sampler=sampler, persistent_workers=workers > 0, **common)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Point a loader from `build_loader` at another epoch (and batch) before iterating it again."""
    if isinstance(loader.dataset, IterableDataset):
        loader.dataset.set_epoch(epoch, start_batch)
    else:
        loader.sampler.set_epoch(epoch, start_batch)


def build_caption_dataset(path: str | Path, *, data_format: str | None = None, image_key: str = "image",
                          caption_key: str = "caption", transform: Transform, tokenizer: Tokenizer,
                          val_fraction: float = 0.0, seed: int = 0, images_dir: str | Path | None = None,
                          val_transform: Transform | None = None) -> tuple[Dataset, Dataset | None]:
    """(train dataset, validation dataset or None) for any supported caption format.

    The split is by image, so no image's captions land on both sides. Webdataset shards are
    split by shard (the last shards become validation). `val_transform` (default: `transform`)
    is for the validation side, which normally wants the eval transform without augmentation.
    """
    val_transform = val_transform or transform
    source, fmt = resolve_data_path(path, data_format)
    if fmt == "wds":
        from clip_pacl.data.wds import build_wds_datasets

        return build_wds_datasets(str(source), transform=transform, tokenizer=tokenizer, val_fraction=val_fraction,
                                  val_transform=val_transform)
    rows = existing_image_rows(read_caption_rows(source, data_format=fmt, image_key=image_key,
                                                 caption_key=caption_key, images_dir=images_dir), source)
    if val_fraction <= 0:
        return CaptionDataset(rows, transform, tokenizer), None
    train_rows, val_rows = split_by_image(rows, val_fraction, seed)
    if not val_rows:
        raise DataError(f"{path} has too few images ({len(rows)} rows) to hold out a validation split")
    return CaptionDataset(train_rows, transform, tokenizer), CaptionDataset(val_rows, val_transform, tokenizer)


def existing_image_rows(rows: Sequence[CaptionRow], source: str | Path) -> list[CaptionRow]:
    """The rows whose image file exists. Every listed path is checked before any training (STAT_THREADS at once),
    so a wrong image folder or path column fails now in one line, not as one skipped image per step: none there
    is an error; some missing are counted, reported once and their rows skipped (as unreadable images are)."""
    images = list(dict.fromkeys(row.image for row in rows))
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        exists = dict(zip(images, pool.map(os.path.isfile, images, chunksize=256)))
    missing = [image for image in images if not exists[image]]
    if not missing:
        return list(rows)
    name = Path(source).name
    if len(missing) == len(images):
        raise DataError(f"none of the {len(images)} images {name} lists exists (e.g. {missing[0]}); image paths are "
                        f"relative to the folder of {name}, or to --images DIR")
    kept = [row for row in rows if exists[row.image]]
    log.warning("skipping %d of %d images %s lists (%d rows): the files do not exist (e.g. %s)", len(missing),
                len(images), name, len(rows) - len(kept), missing[0])
    return kept
