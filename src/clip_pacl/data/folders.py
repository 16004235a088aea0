"""An image folder with captions beside the images: `cat.jpg` + `cat.txt` (one caption per line)."""

from __future__ import annotations

from pathlib import Path

from clip_pacl.data.images import IMAGE_EXTENSIONS
from clip_pacl.data.rows import CaptionRow
from clip_pacl.errors import DataError


def image_files(folder: Path) -> list[Path]:
    """Every image under `folder` (recursively), sorted so that order does not depend on the filesystem."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_folder_captions(folder: Path) -> list[CaptionRow]:
    """One row per non-empty line of each image's `.txt`; images without a caption file are skipped."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    images = image_files(folder)
    if not images:
        raise DataError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    rows = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            lines = sidecar.read_text(encoding="utf-8-sig").splitlines()
            rows.extend(CaptionRow(image, line.strip()) for line in lines if line.strip())
    if not rows:
        raise DataError(f"{folder} has {len(images)} images but no caption files beside them "
                        f"(e.g. {images[0].with_suffix('.txt').name})")
    return rows
