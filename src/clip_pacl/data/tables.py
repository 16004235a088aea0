"""CSV / TSV / JSONL / JSON-list tables of `image,caption` or `image,label` rows.

Image paths are relative to the table's folder (or to `images_dir` when given), so a dataset folder
can be moved or mounted anywhere. Column problems are reported before any image is touched, all in one
line with the columns that do exist, because a wrong column name is the most common first-run mistake.

Column names: a key left at its default (`image`, `caption`, `label`) also accepts the other common names
in `COLUMN_ALIASES`, the first one the table has in that order; open_clip's CSVs (`filepath`, `title`) and
most exported datasets read without flags. A key given as anything else must be there exactly.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clip_pacl.data.rows import CaptionRow, LabelRow
from clip_pacl.errors import DataError

TABLE_FORMATS = ("csv", "tsv", "jsonl", "json")
# what each default key also accepts, in order of preference (the default itself first); README "Your own data"
COLUMN_ALIASES = {
    "image": ("image", "filepath", "image_path", "img", "file_name", "filename", "path"),
    "caption": ("caption", "title", "text", "captions", "sentence"),
    "label": ("label", "class", "category", "class_name"),
}


def table_format(path: Path) -> str | None:
    """The table format a file name implies, or None when it is not a table."""
    suffix = path.suffix.lower()
    return {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}.get(suffix)


def read_records(path: Path, fmt: str) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """The column names and an iterator of (line number, record). Errors name the file and line."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass the data file inside it or use --data-format")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    if fmt in ("csv", "tsv"):
        return _csv_records(path, text, fmt)
    if fmt == "jsonl":
        records = list(_jsonl_records(path, text))
    elif fmt == "json":
        records = _json_list_records(path, text)
    else:
        raise DataError(f"unknown table format {fmt!r} (known: {', '.join(TABLE_FORMATS)})")
    if not records:
        raise DataError(f"data file {path} has no rows")
    return list(records[0][1]), iter(records)


def _csv_records(path: Path, text: str, fmt: str) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    header_line = text.splitlines()[0]
    delimiter = "\t" if fmt == "tsv" or ("\t" in header_line and "," not in header_line) else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = columns

    def records() -> Iterator[tuple[int, dict[str, Any]]]:
        for record in reader:
            yield reader.line_num, record

    return columns, records()


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {line_no} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path.name} line {line_no} is not a JSON object")
        yield line_no, record


def _json_list_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path.name} is neither a COCO captions file nor a JSON list of objects")
    return [(i + 1, r) for i, r in enumerate(data)]


def require_columns(path: Path, columns: list[str], wanted: dict[str, str]) -> None:
    """`wanted` maps a column name to the flag that renames it, for the hint in the error."""
    resolve_columns(path, columns, {column: (column, flag) for column, flag in wanted.items()}, aliases=False)


def resolve_columns(path: Path, columns: list[str], wanted: dict[str, tuple[str, str]],
                    aliases: bool = True) -> dict[str, str]:
    """The column each role reads: `wanted` maps a role ("image", "caption", "label") to (the key asked for, the
    flag that sets it). A key left at its role's default may be any of `COLUMN_ALIASES[role]`. Every missing
    column is named in one error, with the columns the table has."""
    found, missing, flags = {}, [], []
    for role, (key, flag) in wanted.items():
        names = COLUMN_ALIASES.get(role, (key,)) if aliases and key == role else (key,)
        found[role] = next((name for name in names if name in columns), None)
        if found[role] is None:
            missing.append(f"column '{key}'" if len(names) == 1 else f"{role} column ({' / '.join(names)})")
            flags.append(flag)
    if missing:
        shown = ", ".join(columns) if columns else "none"
        raise DataError(f"{path.name} has no {' and no '.join(missing)} (columns: {shown}); use {' and '.join(flags)}")
    return found


def resolve_image(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _cell(path: Path, line_no: int, record: dict[str, Any], key: str, what: str) -> Any:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()) or value == []:
        raise DataError(f"{path.name} line {line_no} has an empty {what} (column '{key}')")
    return value


def read_caption_table(path: Path, fmt: str, *, image_key: str = "image", caption_key: str = "caption",
                       images_dir: Path | None = None) -> list[CaptionRow]:
    """Rows of a caption table; a JSON(L) caption may be a list of strings (several captions per image)."""
    columns, records = read_records(path, fmt)
    keys = resolve_columns(path, columns, {"image": (image_key, "--image-key"),
                                           "caption": (caption_key, "--caption-key")})
    image_key, caption_key = keys["image"], keys["caption"]
    root = images_dir or path.parent
    rows = []
    for line_no, record in records:
        image = resolve_image(root, str(_cell(path, line_no, record, image_key, "image path")).strip())
        caption = _cell(path, line_no, record, caption_key, "caption")
        for text in caption if isinstance(caption, list) else [caption]:
            rows.append(CaptionRow(image, str(text).strip()))
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def read_label_rows(path: str | Path, *, image_key: str = "image", label_key: str = "label",
                    images_dir: str | Path | None = None) -> list[LabelRow]:
    """Rows of an `image,label` table (CSV, TSV, JSONL or JSON list), for zero-shot and linear-probe eval."""
    path = Path(path)
    fmt = table_format(path)
    if fmt is None:
        raise DataError(f"{path.name} is not a label table (expected .csv, .tsv, .jsonl or .json)")
    columns, records = read_records(path, fmt)
    keys = resolve_columns(path, columns, {"image": (image_key, "--image-key"), "label": (label_key, "--label-key")})
    image_key, label_key = keys["image"], keys["label"]
    root = Path(images_dir) if images_dir else path.parent
    rows = [LabelRow(resolve_image(root, str(_cell(path, n, r, image_key, "image path")).strip()),
                     str(_cell(path, n, r, label_key, "label")).strip())
            for n, r in records]
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows
