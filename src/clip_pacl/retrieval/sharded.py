"""Index build across processes and machines: `torchrun --nnodes N --nproc-per-node M -m clip_pacl_app index build`.

Every rank lists the same images and embeds one contiguous block of them (rank r of W: items [r n / W,
(r + 1) n / W) of the n inputs), then writes the block beside the index, in `.IDX.shards/rank-00000.npy`
(float32 (M_r, D)) and `rank-00000.json` (its paths, file stats and unreadable images). One all-reduce, which is
also the barrier, tells every rank whether all of them succeeded; rank 0 then reads the blocks in rank order
(the input order), removes the folder, and returns one ImageIndex with the meta.json a single-process build
writes. The caller saves it with the usual atomic `ImageIndex.save`: a failing rank fails every rank before
anything is saved, so IDX keeps the index it had.

The block files are never inside IDX (an index dir holds only index files, and its save replaces it whole).
IDX must be on a filesystem every node sees, as a training run's checkpoints must. The process group is gloo
whatever the device: a few integers travel through it, the embeddings travel as files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from clip_pacl.atomic import atomic_write
from clip_pacl.console import log
from clip_pacl.encode import encode_images
from clip_pacl.errors import DataError
from clip_pacl.retrieval.build import file_stat, index_meta, weights_fingerprint
from clip_pacl.retrieval.store import ImageIndex

if TYPE_CHECKING:
    from clip_pacl.train.distributed import DistInfo

# A collective waits this long for the slowest rank: ranks embed equal blocks, but nodes differ in speed.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


@dataclass
class Part:
    """One rank's block: the readable images' embeddings, paths and file stats (and metadata, for webdataset
    samples), and the unreadable ones."""

    embeddings: torch.Tensor  # (M, D) float32, L2-normalised
    paths: list[str]
    stats: list[dict[str, int] | None]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    metadata: list[dict[str, Any]] | None = None


@dataclass
class ShardedBuild:
    """What a sharded build returns: on rank 0 the merged index, on the other ranks `index` None."""

    index: ImageIndex | None
    unreadable: list[tuple[str, str]]  # every rank's, in input order (rank 0; [] elsewhere)
    unreadable_per_rank: list[int]  # (rank 0; [] elsewhere)


def shard_dir(out: str | Path) -> Path:
    """Where the ranks write their blocks for index `out`: `.NAME.shards` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.shards"


def rank_block(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous share of n items; the blocks of ranks 0..W-1 cover 0..n-1 in order."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def embed_files(model: torch.nn.Module, paths: Sequence[Path], batch_size: int = 64, workers: int = 0,
                progress: bool = True) -> Part:
    """The Part of image files `paths` (possibly none)."""
    stats = [file_stat(p) for p in paths]
    features, kept, unreadable = encode_images(model, paths, batch_size, workers, progress)
    rows = kept.tolist()
    return Part(features.float(), [str(paths[i]) for i in rows], [stats[i] for i in rows], unreadable)


def build_index_sharded(
    model: torch.nn.Module,
    items: Sequence[Any],
    out: str | Path,
    embed: Callable[[Sequence[Any]], Part],
    *,
    model_source: str | None = None,
    images: dict[str, str] | None = None,
    hub_revision: str | None = None,
    quantize: str | None = None,
    root: str | None = None,
    allow_outside_root: bool = False,
    precision: str | None = None,
) -> ShardedBuild:
    """Embed this rank's block of `items` (the same list on every rank: image paths, or webdataset shards) with
    `embed(block) -> Part`, and on rank 0 merge every rank's block into one index (module docstring).
    `model` is the float32 model (its fingerprint is checked and recorded); `quantize` ("int8" or None) records
    how `embed` encodes, and `precision` at which precision; `root` and `allow_outside_root` are recorded as
    `build_index` records them.

    Joins the process group (gloo, env:// as torchrun sets it) unless one exists, and leaves it when done.
    """
    from clip_pacl.train.distributed import env_dist_info, init_distributed  # (the train package is heavy to load)

    own_group = not dist.is_initialized()
    info = init_distributed("cpu", timeout=COLLECTIVE_TIMEOUT) if own_group else env_dist_info()
    try:
        _check_ranks_agree(info, [str(item) for item in items], weights_fingerprint(model))
        folder = shard_dir(out)
        block = list(items[rank_block(len(items), info.rank, info.world_size)])
        error = None
        try:
            part = embed(block)
            _write_part(folder, info.rank, part)
            log(f"rank {info.rank}/{info.world_size}: {len(block)} inputs, {len(part.paths)} images embedded, "
                f"{len(part.unreadable)} unreadable")
        except Exception as e:  # still take part in the all-reduce below, or the other ranks would wait on it
            error = e
        failed = _failed_ranks(info, error is not None)
        if failed and info.is_main:
            shutil.rmtree(folder, ignore_errors=True)
        if error is not None:
            raise error
        if failed:
            raise DataError(f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of "
                            f"{info.world_size} failed (see their errors); no index was written")
        if not info.is_main:
            return ShardedBuild(None, [], [])
        try:
            parts = [_read_part(folder, rank) for rank in range(info.world_size)]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return index_from_parts(model, parts, len(items), model_source=model_source, images=images,
                                hub_revision=hub_revision, quantize=quantize, root=root,
                                allow_outside_root=allow_outside_root, precision=precision)
    finally:
        if own_group:
            dist.destroy_process_group()


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _check_ranks_agree(info: DistInfo, items: list[str], fingerprint: str) -> None:
    """Every rank must list the same inputs and hold the same weights, or the merged index would be nonsense."""
    values = torch.tensor([_digest64("\n".join(items)), _digest64(fingerprint)], dtype=torch.int64)
    low, high = values.clone(), values.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low[0] != high[0]:
        raise DataError(f"the {info.world_size} ranks list different images ({len(items)} here): the images must "
                        f"be on a filesystem every node sees, unchanged during the build")
    if low[1] != high[1]:
        raise DataError("the ranks loaded different weights: a preset or model-config JSON is randomly initialised "
                        "on each rank; save the model with clip_pacl.save and pass that checkpoint as --model")


def _failed_ranks(info: DistInfo, failed: bool) -> list[int]:
    flags = torch.zeros(info.world_size, dtype=torch.int32)
    flags[info.rank] = int(failed)
    dist.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def _part_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rank-{rank:05d}.npy", folder / f"rank-{rank:05d}.json"


def _write_part(folder: Path, rank: int, part: Part) -> None:
    """The block's two files, each renamed into place once whole; the JSON (written last) marks it complete."""
    folder.mkdir(parents=True, exist_ok=True)
    npy, meta = _part_files(folder, rank)
    array = part.embeddings.numpy().astype(np.float32, copy=False)

    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
            np.save(f, array)

    atomic_write(npy, write_npy)
    rows = [{"path": p, **(s or {})} for p, s in zip(part.paths, part.stats)]
    for row, metadata in zip(rows, part.metadata or []):
        row["metadata"] = metadata
    record = {"rank": rank, "count": len(rows), "rows": rows, "unreadable": [list(u) for u in part.unreadable]}
    atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(record, ensure_ascii=False) + "\n"))


def _read_part(folder: Path, rank: int) -> Part:
    npy, meta = _part_files(folder, rank)
    if not meta.is_file() or not npy.is_file():
        raise DataError(f"rank {rank}'s block ({meta}) is missing although the rank finished: the index's folder "
                        f"must be on a filesystem every node sees")
    record = json.loads(meta.read_text(encoding="utf-8"))
    embeddings = torch.from_numpy(np.load(npy, allow_pickle=False))
    if record.get("rank") != rank or len(embeddings) != record["count"] or len(record["rows"]) != record["count"]:
        raise DataError(f"rank {rank}'s block in {folder} is inconsistent ({len(embeddings)} embeddings, "
                        f"{record.get('count')} rows)")
    stats = [{"size": r["size"], "mtime_ns": r["mtime_ns"]} if "size" in r else None for r in record["rows"]]
    metadata = [r.get("metadata", {}) for r in record["rows"]] if any("metadata" in r for r in record["rows"]) \
        else None
    return Part(embeddings, [r["path"] for r in record["rows"]], stats,
                [(p, reason) for p, reason in record["unreadable"]], metadata)


def index_from_parts(model: torch.nn.Module, parts: list[Part], n_inputs: int, **meta: Any) -> ShardedBuild:
    """Blocks (the ranks', in rank order) as one index with the meta.json `build_index` writes; `meta`: its
    keyword arguments (model_source, images, hub_revision, quantize, root, allow_outside_root, precision)."""
    unreadable = [u for part in parts for u in part.unreadable]
    paths = [p for part in parts for p in part.paths]
    if not paths:
        example = f" (e.g. {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise DataError(f"none of the {n_inputs} inputs could be read{example}")
    embeddings = torch.cat([part.embeddings for part in parts if len(part.paths)]).float()  # (M, D)
    stats = [s for part in parts for s in part.stats]
    with_metadata = [part for part in parts if part.paths and part.metadata is not None]
    metadata = [m for part in parts for m in part.metadata or [{}] * len(part.paths)] if with_metadata else None
    index = ImageIndex(embeddings, paths, index_meta(model, len(paths), len(unreadable), **meta),
                       stats if all(s is not None for s in stats) else None, metadata)
    return ShardedBuild(index, unreadable, [len(part.unreadable) for part in parts])
