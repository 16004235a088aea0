"""Which reader a data path needs, and `read_caption_rows`, the one entry point for caption data.

Detection, by path: `.csv`/`.tsv`/`.jsonl` tables; `.json` is COCO when it has `images` and
`annotations`, else a JSON list of row objects; `.txt`/`.token` is a Flickr captions file; a
pattern with `{..}` or a `.tar` is webdataset shards; a directory is resolved to the one caption
table inside it (`captions.csv` ...), Flickr's `captions.txt`, `*.tar` shards, or else an image
folder with `.txt` captions. `data_format` forces a reader when the guess is wrong.
"""

from __future__ import annotations

from pathlib import Path

from clip_pacl.data.coco import read_coco_captions
from clip_pacl.data.flickr import has_pipe_header, read_flickr_captions
from clip_pacl.data.folders import read_folder_captions
from clip_pacl.data.rows import CaptionRow
from clip_pacl.data.tables import read_caption_table, table_format
from clip_pacl.errors import DataError

DATA_FORMATS = ("csv", "tsv", "jsonl", "json", "coco", "flickr", "folder", "wds")
CAPTION_FILES = ("captions.csv", "captions.tsv", "captions.jsonl", "captions.txt", "Flickr8k.token.txt",
                 "results_20130124.token", "results.csv")


def is_wds_pattern(path: str | Path) -> bool:
    text = str(path)
    return ("{" in text and ".." in text) or text.endswith(".tar") or "::" in text


def resolve_data_path(path: str | Path, data_format: str | None = None) -> tuple[Path | str, str]:
    """(the file, folder or shard pattern to read, its format)."""
    if data_format is not None and data_format not in DATA_FORMATS:
        raise DataError(f"unknown --data-format {data_format!r} (choose from {', '.join(DATA_FORMATS)})")
    if data_format == "wds" or (data_format is None and is_wds_pattern(path) and not Path(path).is_dir()):
        return str(path), "wds"
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if p.is_dir():
        if data_format == "folder":
            return p, "folder"
        inner = next((p / name for name in CAPTION_FILES if (p / name).is_file()), None)
        if inner is not None:
            return resolve_data_path(inner, data_format)
        if data_format is None and any(p.glob("*.tar")):
            return str(p), "wds"
        if data_format in (None, "folder"):
            return p, "folder"
        raise DataError(f"{p} is a directory; --data-format {data_format} needs a file")
    if data_format is not None:
        return p, data_format
    return p, _detect_file_format(p)


def _detect_file_format(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in (".txt", ".token"):
        return "flickr"
    if suffix == ".csv" and has_pipe_header(p):
        return "flickr"
    if suffix == ".json":
        with open(p, encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith("[") else "coco"
    fmt = table_format(p)
    if fmt is None:
        raise DataError(f"cannot tell the format of {p.name} from its name; use --data-format "
                        f"({', '.join(DATA_FORMATS)})")
    return fmt


def read_caption_rows(path: str | Path, *, data_format: str | None = None, image_key: str = "image",
                      caption_key: str = "caption", images_dir: str | Path | None = None) -> list[CaptionRow]:
    """Every (image path, caption) row of a caption dataset; several rows may share an image.

    Nothing is decoded here: missing or corrupt images surface later, one at a time, in the dataset.
    """
    source, fmt = resolve_data_path(path, data_format)
    images = Path(images_dir) if images_dir is not None else None
    if fmt == "wds":
        raise DataError(f"{source} is webdataset shards, which are streamed, not listed; "
                        f"use build_caption_dataset() to read them")
    assert isinstance(source, Path)
    if fmt in ("csv", "tsv", "jsonl", "json"):
        return read_caption_table(source, fmt, image_key=image_key, caption_key=caption_key, images_dir=images)
    if fmt == "coco":
        return read_coco_captions(source, images)
    if fmt == "flickr":
        return read_flickr_captions(source, images)
    return read_folder_captions(source)
