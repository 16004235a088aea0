"""Flickr8k / Flickr30k caption files, in the three layouts they are distributed in.

- `captions.txt` as CSV with an `image,caption` header (the Kaggle Flickr8k copy);
- `Flickr8k.token.txt` / `results_20130124.token`: `name.jpg#0<TAB>caption` per line (the original);
- `results.csv` with `image_name| comment_number| comment` (the Kaggle Flickr30k copy).
Five rows per image; the images live in a sibling folder whose name varies, so it is looked for.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from clip_pacl.data.images import locate_image_dir
from clip_pacl.data.rows import CaptionRow
from clip_pacl.errors import DataError

IMAGE_FOLDERS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images", "flickr30k-images")


def has_pipe_header(path: Path) -> bool:
    """True for Flickr30k's `results.csv` (`image_name| comment_number| comment`), which is not a plain CSV."""
    with open(path, encoding="utf-8-sig") as f:
        return f.readline().strip().lower().startswith("image_name|")


def _token_line(line: str) -> tuple[str, str] | None:
    name, sep, caption = line.partition("\t")
    if not sep or "#" not in name:
        return None
    return name.rsplit("#", 1)[0].strip(), caption.strip()


def _parse(path: Path, text: str) -> list[tuple[str, str]]:
    lines = text.splitlines()
    header = lines[0].strip().lower() if lines else ""
    if header.replace(" ", "") == "image,caption":
        reader = csv.reader(io.StringIO(text, newline=""))
        next(reader)
        return [(r[0].strip(), ",".join(r[1:]).strip()) for r in reader if r]
    if header.startswith("image_name|"):
        out = []
        for line_no, line in enumerate(lines[1:], start=2):
            parts = [p.strip() for p in line.split("|")]
            if not line.strip():
                continue
            if len(parts) < 3:
                raise DataError(f"{path.name} line {line_no} is not 'image_name| comment_number| comment'")
            out.append((parts[0], "|".join(parts[2:]).strip()))
        return out
    out = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parsed = _token_line(line)
        if parsed is None:
            raise DataError(f"{path.name} line {line_no} is not 'name.jpg#N<TAB>caption' "
                            f"(nor is the file an image,caption CSV)")
        out.append(parsed)
    return out


def read_flickr_captions(path: Path, images_dir: Path | None = None) -> list[CaptionRow]:
    if not path.is_file():
        raise DataError(f"Flickr captions file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    pairs = [(name, caption) for name, caption in _parse(path, text) if caption]
    if not pairs:
        raise DataError(f"{path.name} has no captions")
    here, above = path.parent, path.parent.parent
    candidates = [here, *(here / f for f in IMAGE_FOLDERS), *(above / f for f in IMAGE_FOLDERS)]
    root = locate_image_dir(path, pairs[0][0], candidates, images_dir)
    return [CaptionRow(root / name, caption) for name, caption in pairs]
