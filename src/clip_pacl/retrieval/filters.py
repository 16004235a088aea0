"""Search restricted to part of an index: the images whose path starts with a prefix.

The filter comes before the top-k: the k best images *under the prefix* come back (fewer only when fewer
match), not the matching few of the index-wide top k. The search over the matching rows is exact (torch),
whatever backend the whole index would use.

Matching a prefix is a bisection in the paths sorted once per index (then O(log N + M) per search). Scoring
gathers the M matching rows' embeddings when they are few, else scores every row and keeps the matching ones,
so a filtered search never costs much more than an unfiltered exact one.

A prefix is a plain string prefix of the indexed paths (absolute file paths, or `shard#key` for webdataset
samples): `/data/photos/cats` also matches `/data/photos/cats2/...`; end it with `/` to mean a folder.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Sequence

import torch

from clip_pacl.errors import DataError
from clip_pacl.retrieval.store import ImageIndex, SearchHit

# Gather the matching rows' embeddings when they are under 1/GATHER_BELOW of the index; else score all rows.
GATHER_BELOW = 16


def check_prefix(prefix: object) -> str:
    """`prefix` itself when it is a usable path prefix; a one-sentence DataError otherwise."""
    if not isinstance(prefix, str):
        raise DataError(f"the path prefix must be a string, got {type(prefix).__name__}")
    if not prefix:
        raise DataError("the path prefix is empty (leave it out to search every image)")
    if "\0" in prefix:
        raise DataError("the path prefix contains a NUL character")
    return prefix


def prefix_rows(index: ImageIndex, prefix: str) -> list[int]:
    """The rows whose path starts with `prefix`, in index order: a range of the paths in sorted order, found by
    bisection (the sorted order is made on the first call and kept on the index)."""
    prefix = check_prefix(prefix)
    order = index._path_order
    if order is None or order[0] is not index.paths or len(order[1]) != len(index.paths):
        ranked = sorted(range(len(index.paths)), key=index.paths.__getitem__)
        order = index._path_order = (index.paths, [index.paths[i] for i in ranked], ranked)
    _, sorted_paths, ranked = order
    low = bisect.bisect_left(sorted_paths, prefix)
    # Every path with the prefix sorts before the prefix with its last character bumped (the largest character
    # cannot be: the one before it is, and a prefix of only largest characters has no bound).
    stem = prefix.rstrip(chr(sys.maxunicode))
    high = bisect.bisect_left(sorted_paths, stem[:-1] + chr(ord(stem[-1]) + 1)) if stem else len(sorted_paths)
    return sorted(ranked[low:high])


def search_rows(index: ImageIndex, queries: torch.Tensor, k: int, rows: Sequence[int]) -> list[list[SearchHit]]:
    """The k best of `rows` for each query (Q, D) (normalised here), best first, exactly; [] per query when `rows`
    is empty."""
    queries = index.check_queries(queries, k)  # (Q, D)
    if not rows:
        return [[] for _ in range(len(queries))]
    selected = torch.as_tensor(rows, dtype=torch.long)  # (M,)
    if len(rows) * GATHER_BELOW < len(index):  # a few rows: copy their embeddings (M, D) and score only them
        scores = queries @ index.embeddings[selected].T  # (Q, M)
    else:  # many: score every row (as an unfiltered search does) and keep the matching columns, (Q, M)
        scores = (queries @ index.embeddings.T)[:, selected]
    top, where = scores.topk(min(k, len(rows)), dim=1)  # (Q, k) each
    return [[index.hit(rows[j], float(s)) for s, j in zip(row_s.tolist(), row_j.tolist())]
            for row_s, row_j in zip(top, where)]


def search_prefix(index: ImageIndex, queries: torch.Tensor, k: int, prefix: str) -> list[list[SearchHit]]:
    """The k best images whose path starts with `prefix`, for each query (Q, D)."""
    return search_rows(index, queries, k, prefix_rows(index, prefix))
