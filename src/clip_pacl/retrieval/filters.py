"""Search restricted to part of an index: the images whose path starts with a prefix.

The filter comes before the top-k: the k best images *under the prefix* come back (fewer only when fewer
match), not the matching few of the index-wide top k. The search over the matching rows is exact (torch),
whatever backend the whole index would use: the rows are gathered into a small index of their own.

A prefix is a plain string prefix of the indexed paths (absolute file paths, or `shard#key` for webdataset
samples): `/data/photos/cats` also matches `/data/photos/cats2/...`; end it with `/` to mean a folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clip_pacl.errors import DataError
from clip_pacl.retrieval.index import ImageIndex, SearchHit


def check_prefix(prefix: object) -> str:
    """`prefix` itself when it is a usable path prefix; a one-sentence DataError otherwise."""
    if not isinstance(prefix, str):
        raise DataError(f"the path prefix must be a string, got {type(prefix).__name__}")
    if not prefix:
        raise DataError("the path prefix is empty (leave it out to search every image)")
    if "\0" in prefix:
        raise DataError("the path prefix contains a NUL character")
    return prefix


def prefix_rows(paths: Sequence[str], prefix: str) -> list[int]:
    """The rows whose path starts with `prefix`, in index order."""
    prefix = check_prefix(prefix)
    return [i for i, path in enumerate(paths) if path.startswith(prefix)]


def search_rows(index: ImageIndex, queries: torch.Tensor, k: int, rows: Sequence[int]) -> list[list[SearchHit]]:
    """The k best of `rows` for each query (Q, D), best first, exactly; [] per query when `rows` is empty."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not rows:
        return [[] for _ in range(len(queries))]
    selected = torch.as_tensor(rows, dtype=torch.long)
    part = ImageIndex(index.embeddings[selected], [index.paths[i] for i in rows],
                      metadata=[index.metadata[i] for i in rows] if index.metadata is not None else None)
    return part.search(queries, k, backend="torch")


def search_prefix(index: ImageIndex, queries: torch.Tensor, k: int, prefix: str) -> list[list[SearchHit]]:
    """The k best images whose path starts with `prefix`, for each query (Q, D)."""
    return search_rows(index, queries, k, prefix_rows(index.paths, prefix))
