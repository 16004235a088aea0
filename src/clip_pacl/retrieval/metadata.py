"""Row metadata: an index built from a table keeps each image's other columns (caption, label, ...).

They are stored per row in IDX/paths.jsonl (`"metadata": {column: value}`), plain JSON, so loading an index
never runs or unpickles anything, and come back with every search result (`SearchHit.metadata`). An image
listed by several rows (several captions) carries its first row's columns. Images indexed from a folder
have no metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clip_pacl.data.tables import read_records, require_columns, resolve_image, table_format
from clip_pacl.retrieval.store import ImageIndex


def table_metadata(source: str | Path, image_key: str = "image") -> dict[str, dict[str, Any]] | None:
    """{resolved image path: the first row's other columns} of a CSV/TSV/JSONL table; None for a folder, or
    for a table with no column besides `image_key`."""
    source = Path(source)
    fmt = table_format(source) if source.is_file() else None
    if fmt is None:
        return None
    columns, records = read_records(source, fmt)
    require_columns(source, columns, {image_key: "--image-key"})
    if not [c for c in columns if c != image_key]:
        return None
    found: dict[str, dict[str, Any]] = {}
    for _, record in records:
        image = str(record.get(image_key) or "").strip()
        if image:
            path = str(resolve_image(source.parent, image).resolve())
            found.setdefault(path, {key: value for key, value in record.items()
                                     if isinstance(key, str) and key != image_key})  # (a CSV row's extra cells: None)
    return found


def attach_metadata(index: ImageIndex, by_path: dict[str, dict[str, Any]] | None) -> ImageIndex:
    """Give every row of `index` its metadata from `by_path` (None: not a table; the index keeps what it has,
    e.g. webdataset samples' own). Returns `index`."""
    if by_path is not None:
        index.metadata = [by_path.get(path, {}) for path in index.paths]
    return index
