"""An image index on disk: its fields, its directory format, atomic save and recovery, and `search`.

Layout of an index directory (plain formats, so numpy or any other tool can read it):

```
IDX/embeddings.npy   float32 (N, D), L2-normalised rows
IDX/paths.jsonl      one {"path": "/absolute/path", "size": bytes, "mtime_ns": ns} per row, in the same order
                     (+ "metadata": {column: value} when built from a table with columns besides the image's)
IDX/meta.json        model source, weights fingerprint, preprocessing, image source, root, embed dim, count, ...
IDX/ann.faiss        only with `index build --faiss-index`: an approximate faiss index (`retrieval/ann.py`)
```

Saving is atomic (`clip_pacl.atomic.write_directory`): the files are written and fsynced in a temporary
directory `.IDX.tmp-PID` beside IDX, which then replaces IDX by rename (the old IDX is moved aside to `.IDX.old`
first and removed last). A kill at any moment leaves the old index or the new one: when it falls between the
two renames, `load` reads the moved-aside old index and the next save puts it back first.

`search` checks the queries and delegates the ranking to a backend (`retrieval/backends.py`): exact torch,
exact faiss, or the approximate index with exact re-ranking. Building an index is `retrieval/build.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from clip_pacl.atomic import write_directory
from clip_pacl.errors import CheckpointError, DataError
from clip_pacl.retrieval.ann import ANN_NAME, AnnIndex, build_ann, load_ann
from clip_pacl.retrieval.arrays import load_matrix
from clip_pacl.retrieval.backends import (
    AnnSearch,
    ExactSearch,
    FaissFlatSearch,
    SearchBackend,
    wants_ann,
    wants_faiss,
)

EMBEDDINGS_NAME = "embeddings.npy"
PATHS_NAME = "paths.jsonl"
META_NAME = "meta.json"
INDEX_FILES = (EMBEDDINGS_NAME, PATHS_NAME, META_NAME)
FORMAT_VERSION = 2


class SearchHit(NamedTuple):
    path: str
    score: float
    metadata: dict[str, Any] | None = None  # the table row's other columns (caption, ...) when the index has them


@dataclass
class ImageIndex:
    """Image embeddings with their paths; `search` ranks them for query features of the same model."""

    embeddings: torch.Tensor  # (N, D) float32, L2-normalised
    paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    stats: list[dict[str, int]] | None = None  # per row {"size", "mtime_ns"} when built: what `update` compares
    metadata: list[dict[str, Any]] | None = None  # per row, the table's other columns (`retrieval/metadata.py`)
    _faiss_flat: FaissFlatSearch | None = field(default=None, repr=False)  # built on first use (`backend`)
    _path_order: Any = field(default=None, repr=False)  # the paths sorted, for prefix filters (`filters.py`)
    ann: AnnIndex | None = field(default=None, repr=False)  # approximate search, when built (`build_ann`)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.paths):
            raise DataError(f"index has {tuple(self.embeddings.shape)} embeddings for {len(self.paths)} paths")
        if self.stats is not None and len(self.stats) != len(self.paths):
            raise DataError(f"index has {len(self.stats)} file stats for {len(self.paths)} paths")
        if self.metadata is not None and len(self.metadata) != len(self.paths):
            raise DataError(f"index has {len(self.metadata)} metadata rows for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embed_dim(self) -> int:
        return self.embeddings.shape[1]

    def build_ann(self, requested: str, **options: int | None) -> None:
        """Build the approximate faiss index search will use (or, for "auto", none when exact is the better
        choice) and record it in meta.json; `options`: nprobe, ef_search, rerank, train_size (`retrieval/ann.py`)."""
        self.ann, self.meta["ann"] = build_ann(self.embeddings, requested, **options)

    @staticmethod
    def check_target(out_dir: str | Path) -> Path:
        """`out_dir` made absolute, if an index may be saved there: missing, empty or an index (which it replaces);
        a DataError for a file or a folder holding anything else. `index build` asks before it encodes anything."""
        out = Path(out_dir).absolute()
        if out.exists() and not out.is_dir():
            raise DataError(f"{out} exists and is not a directory")
        contents = [p.name for p in out.iterdir()] if out.is_dir() else []
        if contents and (META_NAME not in contents or set(contents) - {*INDEX_FILES, ANN_NAME}):
            raise DataError(f"{out} exists and is not an image index (it holds other files); choose another --out")
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write the index directory atomically, replacing an index already there (module docstring)."""
        out = self.check_target(out_dir)
        return write_directory(out, self._write, temp_prefix=f".{out.name}.tmp-", aside_name=_aside(out).name)

    def _write(self, folder: Path) -> None:
        recorded = (self.meta.get("ann") or {}).get("file")
        if bool(recorded) != (self.ann is not None) or (self.ann is not None and self.ann.ntotal != len(self)):
            raise DataError("the index's approximate faiss index does not match its embeddings; build it again "
                            "with `build_ann`")
        with open(folder / EMBEDDINGS_NAME, "wb") as f:
            np.save(f, self.embeddings.float().numpy())
        with open(folder / PATHS_NAME, "w", encoding="utf-8") as f:
            for i, path in enumerate(self.paths):
                row = {"path": path, **(self.stats[i] if self.stats else {})}
                if self.metadata is not None:
                    row["metadata"] = self.metadata[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (folder / META_NAME).write_text(json.dumps(self.meta, indent=2) + "\n", encoding="utf-8")
        if self.ann is not None:
            self.ann.write(folder)

    @classmethod
    def load(cls, index_dir: str | Path) -> ImageIndex:
        root = Path(index_dir)
        if not root.exists() and _aside(root.absolute()).is_dir():  # a save was killed between its renames
            root = _aside(root.absolute())
        missing = [n for n in INDEX_FILES if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{index_dir} is not an image index (missing {', '.join(missing)}); "
                                  f"make one with `clip-pacl index build`")
        try:
            embeddings = torch.from_numpy(load_matrix(root / EMBEDDINGS_NAME)).float()
            meta = json.loads((root / META_NAME).read_text())
            with open(root / PATHS_NAME, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            paths = [row["path"] for row in rows]
            stats = [{"size": row["size"], "mtime_ns": row["mtime_ns"]} for row in rows] \
                if rows and all("size" in row for row in rows) else None
            metadata = [_metadata_row(row) for row in rows] if any("metadata" in row for row in rows) else None
        except (ValueError, KeyError, TypeError, EOFError, OSError) as e:
            raise CheckpointError(f"{index_dir} is a damaged image index ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{index_dir} is a damaged image index (meta.json is not an object)")
        if embeddings.ndim != 2 or len(embeddings) != len(paths):
            raise CheckpointError(f"{index_dir} is a damaged image index ({EMBEDDINGS_NAME} holds "
                                  f"{tuple(embeddings.shape)} for {len(paths)} paths)")
        for key, value in (("count", len(paths)), ("embed_dim", embeddings.shape[1])):
            if key in meta and meta[key] != value:
                raise CheckpointError(f"{index_dir} is a damaged image index (meta.json says {key} {meta[key]}, "
                                      f"the files hold {value})")
        return cls(embeddings, paths, meta, stats, metadata,
                   ann=load_ann(root, meta.get("ann"), len(paths), embeddings.shape[1]))

    def search(self, queries: torch.Tensor, k: int = 10, backend: str = "auto", *, nprobe: int | None = None,
               ef_search: int | None = None, rerank: int | None = None) -> list[list[SearchHit]]:
        """The k best images for each query (Q, D) (normalised here), best first, by inner product.

        backend: "auto" (the approximate index when the index has one, else exact), "torch" or "faiss" (exact),
        "ann" (the approximate index). nprobe, ef_search, rerank: its query settings (None: the saved ones).
        """
        queries = self.check_queries(queries, k)  # (Q, D)
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(len(queries))]
        ranker = self.backend(backend, nprobe=nprobe, ef_search=ef_search, rerank=rerank)
        scores, indices = ranker.search(queries, k)  # (Q, k) each
        return [[self.hit(i, float(s)) for s, i in zip(row_s.tolist(), row_i.tolist()) if i >= 0]
                for row_s, row_i in zip(scores, indices)]

    def check_queries(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """The queries (Q, D) as float32 rows of unit length on the CPU, after checking k >= 1 and D against the
        index (a ValueError / DataError): what every search of this index takes, filtered or not."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = F.normalize(queries.float().cpu(), dim=-1)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise DataError(f"query features have shape {tuple(queries.shape)} but the index holds "
                            f"{self.embed_dim}-d embeddings (was it built with another model?)")
        return queries

    def hit(self, row: int, score: float) -> SearchHit:
        """Row `row` as a search result: its path, `score` and its metadata (None when the index has none)."""
        return SearchHit(self.paths[row], score, self.metadata[row] if self.metadata is not None else None)

    def backend(self, name: str = "auto", *, nprobe: int | None = None, ef_search: int | None = None,
                rerank: int | None = None) -> SearchBackend:
        """The backend `search` ranks with for these arguments (`retrieval/backends.py`); the faiss copy of the
        embeddings is built on first use and kept."""
        if self.uses_ann(name, nprobe, ef_search, rerank):
            return AnnSearch(self.ann, self.embeddings, nprobe, ef_search, rerank)
        if wants_faiss(name, len(self)):
            if self._faiss_flat is None:
                self._faiss_flat = FaissFlatSearch(self.embeddings)
            return self._faiss_flat
        return ExactSearch(self.embeddings)

    def uses_ann(self, backend: str, nprobe: int | None = None, ef_search: int | None = None,
                 rerank: int | None = None) -> bool:
        """Whether `search` with these arguments asks the approximate index; refuses settings that cannot apply."""
        recorded = bool((self.meta.get("ann") or {}).get("file"))
        return wants_ann(backend, self.ann, recorded, nprobe, ef_search, rerank)


def _metadata_row(row: dict[str, Any]) -> dict[str, Any]:
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise TypeError(f"the metadata of {row['path']} is not a JSON object")
    return metadata


def _aside(out: Path) -> Path:
    return out.parent / f".{out.name}.old"
