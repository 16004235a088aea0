"""Building an image index: which images (a folder, a table), embedding them (reusing what an older index of
the same model holds), and what meta.json records so that search and `update` can trust the index later: the
model source, the weights' fingerprint, the preprocessing, the image source and the root its rows stay inside.

`check_model` is the other side of the fingerprint: a query model whose weights or preprocessing differ from
those that built the index is refused. The index's own format is `retrieval/store.py`; the torchrun build is
`retrieval/sharded.py`, which shares `index_meta`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from clip_pacl.checkpoint.io import effective_precision, set_precision
from clip_pacl.config import available_presets
from clip_pacl.data.images import IMAGE_EXTENSIONS
from clip_pacl.data.tables import read_records, require_columns, resolve_image, table_format
from clip_pacl.encode import encode_images
from clip_pacl.errors import DataError
from clip_pacl.models.quantize import quantize as quantize_model
from clip_pacl.preprocess import model_transform
from clip_pacl.retrieval.store import FORMAT_VERSION, ImageIndex
from clip_pacl.transforms import ImageTransform


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
