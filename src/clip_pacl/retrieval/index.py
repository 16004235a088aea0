"""An image index: normalised image embeddings on disk, searched exactly by inner product.

Layout of an index directory (plain formats, so numpy or any other tool can read it):

```
IDX/embeddings.npy   float32 (N, D), L2-normalised rows
IDX/paths.jsonl      one {"path": "/absolute/path"} per row, in the same order
IDX/meta.json        model source, embed dim, count, creation time, ...
```

Search is an exact matrix product in torch; faiss (`pip install 'clip-pacl[faiss]'`) does the same
exact inner-product search faster on large indexes, and is used when asked or when the index is large.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from clip_pacl.config import available_presets
from clip_pacl.data.images import IMAGE_EXTENSIONS
from clip_pacl.data.tables import read_records, require_columns, resolve_image, table_format
from clip_pacl.encode import encode_images
from clip_pacl.errors import CheckpointError, DataError, MissingDependencyError

EMBEDDINGS_NAME = "embeddings.npy"
PATHS_NAME = "paths.jsonl"
META_NAME = "meta.json"
FORMAT_VERSION = 1
# Above this many images `backend="auto"` uses faiss when it is installed.
FAISS_AUTO_THRESHOLD = 200_000


class SearchHit(NamedTuple):
    path: str
    score: float


@dataclass
class ImageIndex:
    """Image embeddings with their paths; `search` ranks them for query features of the same model."""

    embeddings: torch.Tensor  # (N, D) float32, L2-normalised
    paths: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    _faiss_index: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.paths):
            raise DataError(f"index has {tuple(self.embeddings.shape)} embeddings for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embed_dim(self) -> int:
        return self.embeddings.shape[1]

    def save(self, out_dir: str | Path) -> Path:
        """Write the three files of the index directory (replacing an index already there)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / EMBEDDINGS_NAME, self.embeddings.float().numpy())
        with open(out / PATHS_NAME, "w", encoding="utf-8") as f:
            for path in self.paths:
                f.write(json.dumps({"path": path}, ensure_ascii=False) + "\n")
        (out / META_NAME).write_text(json.dumps(self.meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, index_dir: str | Path) -> ImageIndex:
        root = Path(index_dir)
        missing = [n for n in (EMBEDDINGS_NAME, PATHS_NAME, META_NAME) if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{root} is not an image index (missing {', '.join(missing)}); "
                                  f"make one with `clip-pacl index build`")
        try:
            embeddings = torch.from_numpy(np.load(root / EMBEDDINGS_NAME, allow_pickle=False)).float()
            meta = json.loads((root / META_NAME).read_text())
            with open(root / PATHS_NAME, encoding="utf-8") as f:
                paths = [json.loads(line)["path"] for line in f if line.strip()]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{root} is a damaged image index ({' '.join(str(e).split())})") from None
        return cls(embeddings, paths, meta)

    def search(self, queries: torch.Tensor, k: int = 10, backend: str = "auto") -> list[list[SearchHit]]:
        """The k best images for each query (Q, D) (normalised here), best first, by inner product."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = F.normalize(queries.float().cpu(), dim=-1)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise DataError(f"query features have shape {tuple(queries.shape)} but the index holds "
                            f"{self.embed_dim}-d embeddings (was it built with another model?)")
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(len(queries))]
        if self._use_faiss(backend):
            scores, indices = self._faiss().search(queries.numpy(), k)  # (Q, k) each
            scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
        else:
            scores, indices = (queries @ self.embeddings.T).topk(k, dim=1)  # (Q, k) each
        return [[SearchHit(self.paths[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist())]
                for row_s, row_i in zip(scores, indices)]

    def _use_faiss(self, backend: str) -> bool:
        if backend == "torch":
            return False
        if backend == "faiss":
            _import_faiss()
            return True
        if backend != "auto":
            raise ValueError(f"unknown search backend '{backend}' (auto, torch, faiss)")
        if len(self) < FAISS_AUTO_THRESHOLD:
            return False
        try:
            _import_faiss()
        except MissingDependencyError:
            return False
        return True

    def _faiss(self):
        if self._faiss_index is None:
            faiss = _import_faiss()
            index = faiss.IndexFlatIP(self.embed_dim)  # exact inner product, like the torch path
            index.add(np.ascontiguousarray(self.embeddings.numpy()))
            self._faiss_index = index
        return self._faiss_index


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("faiss-cpu", "faiss", "faiss search") from None
    return faiss


def list_image_files(directory: Path) -> list[Path]:
    """Every image file under `directory`, recursively, in a stable (sorted) order, as absolute paths."""
    return sorted(p.resolve() for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def image_paths(source: str | Path, image_key: str = "image") -> list[Path]:
    """The images to index: every image file under a folder, or the image column of a CSV/TSV/JSONL table
    (paths relative to the table's folder; repeated images once, in first-seen order)."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist")
    if source.is_dir():
        paths = list_image_files(source)
        if not paths:
            raise DataError(f"{source} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return paths
    fmt = table_format(source)
    if fmt is None:
        raise DataError(f"{source} is neither a folder of images nor a .csv, .tsv or .jsonl table")
    columns, records = read_records(source, fmt)
    require_columns(source, columns, {image_key: "--image-key"})
    paths = [resolve_image(source.parent, str(r[image_key]).strip()).resolve()
             for _, r in records if str(r.get(image_key) or "").strip()]
    if not paths:
        raise DataError(f"{source} lists no images in column '{image_key}'")
    return list(dict.fromkeys(paths))


def build_index(
    model: torch.nn.Module,
    paths: Sequence[Path],
    batch_size: int = 64,
    workers: int = 0,
    model_source: str | None = None,
    progress: bool = True,
) -> tuple[ImageIndex, list[tuple[str, str]]]:
    """Embed `paths` with `model` into an ImageIndex; returns it and the unreadable images [(path, reason)].

    Duplicate paths are embedded once. `model_source` is recorded so that `search` can reload the model.
    """
    unique = list(dict.fromkeys(Path(p).resolve() for p in paths))
    if not unique:
        raise DataError("no images to index")
    features, kept, unreadable = encode_images(model, unique, batch_size, workers, progress)  # (M, D), (M,)
    if not len(kept):
        raise DataError(f"none of the {len(unique)} images could be read (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_source_string(model_source) if model_source is not None else None,
        "model_has_weights": model_has_weights(model_source),
        "embed_dim": int(features.shape[1]),
        "count": len(kept),
        "unreadable": len(unreadable),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return ImageIndex(features, [str(unique[i]) for i in kept.tolist()], meta), unreadable


def model_has_weights(source: str | None) -> bool:
    """Whether loading `source` again gives the same model: a checkpoint or hub name does; a preset or a
    model-config JSON (random initialisation) does not."""
    if source is None:
        return False
    if Path(source).is_file() and Path(source).suffix.lower() == ".json":
        return False
    return source.removesuffix("-quickgelu") not in available_presets()


def model_source_string(source: str | Path) -> str:
    """The model source as recorded in meta.json: absolute when it is a local path, so search works from anywhere."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else str(source)
