"""How an image index is searched: three backends behind one `search(queries, k) -> (scores, rows)`, and the
rules that pick one (`ImageIndex.search` asks `wants_ann`, then `wants_faiss`; else exact torch).

- `ExactSearch`: the matrix product of the queries and every embedding in torch, then the top k.
- `FaissFlatSearch`: the same exact inner-product search in faiss (`pip install 'clip-pacl[faiss]'`), faster on
  large indexes; used when asked, or by "auto" above FAISS_AUTO_THRESHOLD images when faiss is installed.
- `AnnSearch`: the index's approximate faiss index (`IDX/ann.faiss`, `retrieval/ann.py`) asked for `rerank` x k
  candidates, re-scored exactly against the embeddings; "auto" uses it whenever the index has one.

Every backend takes normalised queries (Q, D) and returns float scores and int64 embedding rows, each (Q, k),
best first; row -1 pads a query that got fewer than k candidates (an IVF index with few lists probed).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from clip_pacl.errors import DataError, MissingDependencyError
from clip_pacl.retrieval.ann import AnnIndex, import_faiss

BACKENDS = ("auto", "torch", "faiss", "ann")
# Above this many images `backend="auto"` uses faiss when it is installed.
FAISS_AUTO_THRESHOLD = 200_000


class SearchBackend(Protocol):
    """What `ImageIndex.search` asks a backend for: the top k rows of the index for each query."""

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rows), each (Q, k), best first, for normalised queries (Q, D); 1 <= k <= the index's size."""
        ...


class ExactSearch:
    """Every embedding scored by a matrix product in torch: the reference the other backends are tested against."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings  # (N, D)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (queries @ self.embeddings.T).topk(k, dim=1)  # (Q, k) each


class FaissFlatSearch:
    """faiss's exact inner-product index (IndexFlatIP) over a copy of the embeddings, built once."""

    def __init__(self, embeddings: torch.Tensor):
        faiss = import_faiss("faiss search")
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings.numpy()))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, rows = self.index.search(queries.numpy(), k)  # (Q, k) each
        return torch.from_numpy(scores), torch.from_numpy(rows)


class AnnSearch:
    """The approximate index with its query settings (None: the saved ones), re-ranked exactly (`AnnIndex.search`)."""

    def __init__(self, ann: AnnIndex, embeddings: torch.Tensor, nprobe: int | None = None,
                 ef_search: int | None = None, rerank: int | None = None):
        self.ann, self.embeddings = ann, embeddings  # embeddings (N, D): what the candidates are re-scored against
        self.settings = (nprobe, ef_search, rerank)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, rows = self.ann.search(queries, k, self.embeddings, *self.settings)  # (Q, k) each
        return torch.from_numpy(scores), torch.from_numpy(rows)


def wants_ann(backend: str, ann: AnnIndex | None, ann_recorded: bool, nprobe: int | None = None,
              ef_search: int | None = None, rerank: int | None = None) -> bool:
    """Whether `backend` with these query settings means the approximate index `ann` (None: the index has none
    loaded; `ann_recorded`: meta.json names one). Refuses settings that cannot apply: approximate settings with an
    exact backend, settings `ann` does not have, an approximate search of an index without one (or, when
    meta.json records one, without faiss to load it)."""
    settings = (nprobe, ef_search, rerank)
    if backend not in ("auto", "ann"):
        if any(v is not None for v in settings):
            raise ValueError("nprobe, ef_search and rerank apply to approximate search only, not to the "
                             f"'{backend}' backend")
        return False
    if ann is not None:
        ann.check(nprobe, ef_search, rerank)
        return True
    if backend == "auto" and all(v is None for v in settings):
        return False
    if ann_recorded:
        import_faiss()  # recorded, but not loaded: faiss is missing
    raise DataError("this index has no approximate faiss index (build one with `clip-pacl index build "
                    "--faiss-index ...`); nprobe, ef_search and rerank apply only to one")


def wants_faiss(backend: str, count: int) -> bool:
    """Whether exact search of `count` embeddings with `backend` (not the approximate index) runs in faiss:
    "faiss" (an error without it), or "auto" from FAISS_AUTO_THRESHOLD images when faiss is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend '{backend}' ({', '.join(BACKENDS)})")
    if backend == "faiss":
        import_faiss("faiss search")
        return True
    if backend != "auto" or count < FAISS_AUTO_THRESHOLD:
        return False
    try:
        import_faiss("faiss search")
    except MissingDependencyError:
        return False
    return True

