"""An image index: normalised image embeddings on disk, searched exactly by inner product.

Layout of an index directory (plain formats, so numpy or any other tool can read it):

```
IDX/embeddings.npy   float32 (N, D), L2-normalised rows
IDX/paths.jsonl      one {"path": "/absolute/path", "size": bytes, "mtime_ns": ns} per row, in the same order
                     (+ "metadata": {column: value} when built from a table with columns besides the image's)
IDX/meta.json        model source, weights fingerprint, preprocessing, image source, root, embed dim, count, ...
IDX/ann.faiss        only with `index build --faiss-index`: an approximate faiss index (`retrieval/ann.py`)
```

Saving is atomic: the files are written and fsynced in a temporary directory beside IDX, which then
replaces IDX by rename (the old IDX is moved aside to `.IDX.old` first and removed last). A kill at any
moment leaves the old index or the new one: when it falls between the two renames, `load` reads the
moved-aside old index and the next save puts it back first.

Search is an exact matrix product in torch; faiss (`pip install 'clip-pacl[faiss]'`) does the same
exact inner-product search faster on large indexes, and is used when asked or when the index is large.
An index built with an approximate faiss index (`retrieval/ann.py`) is searched with it unless told otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from clip_pacl.checkpoint.io import effective_precision, set_precision
from clip_pacl.config import available_presets
from clip_pacl.data.images import IMAGE_EXTENSIONS
from clip_pacl.data.tables import read_records, require_columns, resolve_image, table_format
from clip_pacl.encode import encode_images
from clip_pacl.errors import CheckpointError, DataError, MissingDependencyError
from clip_pacl.models.quantize import quantize as quantize_model
from clip_pacl.preprocess import model_transform
from clip_pacl.retrieval.ann import ANN_NAME, AnnIndex, build_ann, import_faiss, load_ann
from clip_pacl.retrieval.arrays import load_matrix
from clip_pacl.transforms import ImageTransform

EMBEDDINGS_NAME = "embeddings.npy"
PATHS_NAME = "paths.jsonl"
META_NAME = "meta.json"
FORMAT_VERSION = 2
# Above this many images `backend="auto"` uses faiss when it is installed.
FAISS_AUTO_THRESHOLD = 200_000


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
    _faiss_index: Any = field(default=None, repr=False)
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

    def save(self, out_dir: str | Path) -> Path:
        """Write the index directory atomically, replacing an index already there (module docstring)."""
        out = Path(out_dir).absolute()
        if out.exists() and not out.is_dir():
            raise DataError(f"{out} exists and is not a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        aside = _aside(out)
        if aside.exists() and not out.exists():  # a save was killed between its two renames: undo the first
            os.replace(aside, out)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            self._write(tmp)
            _fsync(tmp)
            if out.exists():
                contents = [p.name for p in out.iterdir()]
                if contents and (META_NAME not in contents or set(contents) - {*INDEX_FILES, ANN_NAME}):
                    raise DataError(f"{out} exists and is not an image index (it holds other files); "
                                    f"choose another --out")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(out, aside)
            os.replace(tmp, out)
            _fsync(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return out

    def _write(self, folder: Path) -> None:
        recorded = (self.meta.get("ann") or {}).get("file")
        if bool(recorded) != (self.ann is not None) or (self.ann is not None and self.ann.ntotal != len(self)):
            raise DataError("the index's approximate faiss index does not match its embeddings; build it again "
                            "with `build_ann`")
        with open(folder / EMBEDDINGS_NAME, "wb") as f:
            np.save(f, self.embeddings.float().numpy())
            _flush(f)
        with open(folder / PATHS_NAME, "w", encoding="utf-8") as f:
            for i, path in enumerate(self.paths):
                row = {"path": path, **(self.stats[i] if self.stats else {})}
                if self.metadata is not None:
                    row["metadata"] = self.metadata[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            _flush(f)
        with open(folder / META_NAME, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.meta, indent=2) + "\n")
            _flush(f)
        if self.ann is not None:
            with open(self.ann.write(folder), "rb") as f:
                _flush(f)

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
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = F.normalize(queries.float().cpu(), dim=-1)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise DataError(f"query features have shape {tuple(queries.shape)} but the index holds "
                            f"{self.embed_dim}-d embeddings (was it built with another model?)")
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(len(queries))]
        if self.uses_ann(backend, nprobe, ef_search, rerank):
            scores, indices = self.ann.search(queries, k, self.embeddings, nprobe, ef_search, rerank)  # (Q, k) each
        elif self._use_faiss(backend):
            scores, indices = self._faiss().search(queries.numpy(), k)  # (Q, k) each
            scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
        else:
            scores, indices = (queries @ self.embeddings.T).topk(k, dim=1)  # (Q, k) each
        return [[self.hit(i, float(s)) for s, i in zip(row_s.tolist(), row_i.tolist()) if i >= 0]
                for row_s, row_i in zip(scores, indices)]

    def hit(self, row: int, score: float) -> SearchHit:
        """Row `row` as a search result: its path, `score` and its metadata (None when the index has none)."""
        return SearchHit(self.paths[row], score, self.metadata[row] if self.metadata is not None else None)

    def uses_ann(self, backend: str, nprobe: int | None = None, ef_search: int | None = None,
                 rerank: int | None = None) -> bool:
        """Whether `search` with these arguments asks the approximate index; refuses settings that cannot apply."""
        settings = (nprobe, ef_search, rerank)
        if backend not in ("auto", "ann"):
            if any(v is not None for v in settings):
                raise ValueError("nprobe, ef_search and rerank apply to approximate search only, not to the "
                                 f"'{backend}' backend")
            return False
        if self.ann is not None:
            self.ann.check(nprobe, ef_search, rerank)
            return True
        if backend == "auto" and all(v is None for v in settings):
            return False
        if (self.meta.get("ann") or {}).get("file"):
            import_faiss()  # recorded, but not loaded: faiss is missing
        raise DataError("this index has no approximate faiss index (build one with `clip-pacl index build "
                        "--faiss-index ...`); nprobe, ef_search and rerank apply only to one")

    def _use_faiss(self, backend: str) -> bool:
        if backend == "torch":
            return False
        if backend == "faiss":
            import_faiss("faiss search")
            return True
        if backend != "auto":
            raise ValueError(f"unknown search backend '{backend}' (auto, torch, faiss, ann)")
        if len(self) < FAISS_AUTO_THRESHOLD:
            return False
        try:
            import_faiss("faiss search")
        except MissingDependencyError:
            return False
        return True

    def _faiss(self):
        if self._faiss_index is None:
            faiss = import_faiss("faiss search")
            index = faiss.IndexFlatIP(self.embed_dim)  # exact inner product, like the torch path
            index.add(np.ascontiguousarray(self.embeddings.numpy()))
            self._faiss_index = index
        return self._faiss_index


INDEX_FILES = (EMBEDDINGS_NAME, PATHS_NAME, META_NAME)


def _metadata_row(row: dict[str, Any]) -> dict[str, Any]:
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise TypeError(f"the metadata of {row['path']} is not a JSON object")
    return metadata


def _aside(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _flush(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync(folder: Path) -> None:
    """fsync a directory, so the names in it (and renames into it) survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_image_files(directory: Path) -> list[Path]:
    """Every image file under `directory`, recursively, in a stable (sorted) order, as absolute paths."""
    return sorted(p.resolve() for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def images_root(source: str | Path) -> Path:
    """The folder an index of `source` is confined to: the folder itself, or a table's folder (symlinks resolved)."""
    source = Path(source).resolve()
    return source if source.is_dir() else source.parent


def confine_paths(paths: Sequence[Path], root: str | Path | None, allow_outside_root: bool = False) -> str | None:
    """The root of an index of `paths` (resolved): `root` resolved, or without one the deepest folder holding them
    all. Paths that resolve outside `root` (a symlink leading elsewhere, a table naming another folder) are refused
    with a DataError unless `allow_outside_root`."""
    if root is None:
        try:
            return os.path.commonpath([os.path.dirname(str(p)) for p in paths]) if paths else None
        except ValueError:  # (Windows) paths on several drives
            return None
    root = Path(root).resolve()
    outside = [p for p in paths if not Path(p).is_relative_to(root)]
    if outside and not allow_outside_root:
        raise DataError(f"{len(outside)} of the {len(paths)} images resolve outside {root} (e.g. {outside[0]}: a "
                        f"symlink or a table row leading elsewhere); the server would refuse to show them. Pass "
                        f"--allow-outside-root to index them anyway (recorded in meta.json)")
    return str(root)


def index_root(meta: dict[str, Any], paths: Sequence[str]) -> str | None:
    """The folder an index's rows must resolve inside (`web/confine.py`): meta.json's root, else (an index built
    before roots were recorded) its image source's folder, else the deepest folder holding every row."""
    if isinstance(meta.get("root"), str):
        return meta["root"]
    source = (meta.get("images") or {}).get("source")
    if isinstance(source, str) and (meta.get("images") or {}).get("format") != "wds" and Path(source).exists():
        return str(images_root(source))
    try:
        return os.path.commonpath([os.path.dirname(p.rsplit("#", 1)[0]) for p in paths]) if paths else None
    except ValueError:
        return None


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
    images: dict[str, str] | None = None,
    reuse: ImageIndex | None = None,
    hub_revision: str | None = None,
    quantize: str | None = None,
    root: str | Path | None = None,
    allow_outside_root: bool = False,
    precision: str | None = None,
) -> tuple[ImageIndex, list[tuple[str, str]]]:
    """Embed `paths` with `model` into an ImageIndex; returns it and the unreadable images [(path, reason)].

    Duplicate paths are embedded once. `model_source` is recorded so that `search` can reload the model, and
    `images` ({"source": folder or table, "image_key": column}) so that `update` can list the images again.
    With `reuse` (an index of the same model), images whose size and mtime it recorded are not embedded again.
    `hub_revision` (the commit of a hub model's snapshot) is recorded beside the weights' fingerprint.
    `quantize="int8"` encodes with an int8 copy of `model`; the fingerprint stays that of `model`'s weights and
    meta.json records the quantization (queries may be encoded either way: the embeddings stay comparable);
    `precision="bf16"` likewise encodes with a bfloat16 copy (`encoder_at`).
    `root`: the folder every image must resolve inside (`confine_paths`; None: the deepest folder holding them);
    `allow_outside_root` lets images outside it in, and is recorded (the server then shows them).
    """
    unique = list(dict.fromkeys(Path(p).resolve() for p in paths))
    if not unique:
        raise DataError("no images to index")
    root = confine_paths(unique, root, allow_outside_root)
    stats = [file_stat(p) for p in unique]
    known = {} if reuse is None or reuse.stats is None else {
        (path, stat["size"], stat["mtime_ns"]): row for row, (path, stat) in enumerate(zip(reuse.paths, reuse.stats))}
    reused = {i: known[(str(p), st["size"], st["mtime_ns"])] for i, (p, st) in enumerate(zip(unique, stats))
              if st is not None and (str(p), st["size"], st["mtime_ns"]) in known}
    todo = [i for i in range(len(unique)) if i not in reused]
    encoder = encoder_at(model, quantize, precision) if todo else model
    new_features, new_kept, unreadable = encode_images(encoder, [unique[i] for i in todo], batch_size, workers,
                                                       progress) if todo else (None, torch.empty(0), [])
    rows = {i: reuse.embeddings[row] for i, row in reused.items()}  # (D,) each
    rows.update({todo[j]: new_features[n] for n, j in enumerate(new_kept.tolist())})
    kept = sorted(rows)
    if not kept:
        raise DataError(f"none of the {len(unique)} images could be read (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    meta = index_meta(model, len(kept), len(unreadable), model_source=model_source, images=images,
                      hub_revision=hub_revision, quantize=quantize, reused=len(reused), root=root,
                      allow_outside_root=allow_outside_root,
                      precision=effective_precision(precision, quantize, next(model.parameters()).device))
    embeddings = torch.stack([rows[i] for i in kept]).float()  # (M, D)
    return ImageIndex(embeddings, [str(unique[i]) for i in kept], meta, [stats[i] for i in kept]), unreadable


def encoder_at(model: torch.nn.Module, quantize: str | None, precision: str | None) -> torch.nn.Module:
    """What embeds the images: `model` itself at float32, or a copy int8-quantized (`quantize`) or with bfloat16
    towers (`precision` bf16, or auto on hardware with native bf16), so that `model` keeps the float32 weights
    whose fingerprint the index records. The copy's `precision` says which ran."""
    ran = effective_precision(precision, quantize, next(model.parameters()).device)
    if quantize:
        return set_precision(quantize_model(model, quantize), ran)
    return set_precision(model if ran == "fp32" else copy.deepcopy(model), ran)


def index_meta(model: torch.nn.Module, count: int, unreadable: int, *, model_source: str | None = None,
               images: dict[str, str] | None = None, hub_revision: str | None = None,
               quantize: str | None = None, reused: int = 0, root: str | Path | None = None,
               allow_outside_root: bool = False, precision: str | None = None) -> dict[str, Any]:
    """meta.json of an index of `count` images embedded by `model` (`build_index` and the sharded build);
    `model` is the float32 one (its fingerprint), `quantize` how the images were encoded ("int8" or None),
    `root` the folder its rows must resolve inside (unless `allow_outside_root`; `confine_paths`)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model_source_string(model_source) if model_source is not None else None,
        "model_has_weights": model_has_weights(model_source),
        "weights": weights_fingerprint(model),
        "hub_revision": hub_revision,
        "quantize": quantize,
        "precision": precision or "fp32",
        "preprocessing": preprocessing(model),
        "images": images,
        "root": str(root) if root is not None else None,
        "allow_outside_root": bool(allow_outside_root),
        "embed_dim": int(model.embed_dim),
        "count": count,
        "unreadable": unreadable,
        "reused": reused,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def file_stat(path: Path) -> dict[str, int] | None:
    """{"size", "mtime_ns"} of a file (what `update` compares), or None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None  # missing: counted as unreadable by the encoder
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """blake2b of every tensor of the state dict (name, dtype, shape, bytes): which weights made the embeddings."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return "blake2b:" + digest.hexdigest()


def preprocessing(model: torch.nn.Module) -> dict[str, Any]:
    """How images were turned into pixels: a query embedded another way would not be comparable."""
    transform = model_transform(model)
    if isinstance(transform, ImageTransform):
        return {"image_size": transform.image_size, "mean": [round(float(v), 8) for v in transform.mean.flatten()],
                "std": [round(float(v), 8) for v in transform.std.flatten()],
                "resize": "shorter side bicubic, center crop"}
    return {"transform": repr(transform)}


def check_model(index: ImageIndex, model: torch.nn.Module) -> None:
    """Refuse a model whose weights or preprocessing differ from those that built the index (older indexes,
    which recorded neither, are not checked)."""
    for key, value in (("weights", weights_fingerprint(model)), ("preprocessing", preprocessing(model))):
        recorded = index.meta.get(key)
        if recorded is not None and recorded != value:
            raise DataError(f"the index was built with other {key} than this model's ({key} {_short(recorded)} "
                            f"vs {_short(value)}); rebuild it with `clip-pacl index build`, or pass --force to "
                            f"search it anyway")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:48] + ("..." if len(text) > 48 else "")


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
