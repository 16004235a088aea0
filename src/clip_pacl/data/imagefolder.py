"""Labelled images as an ImageFolder tree (`DIR/<class>/<image>`, torchvision's layout) or as an image,label table.

Like every reader here it lists files and never decodes them: a corrupt image is skipped and counted later,
where it is encoded, so one bad file costs one image rather than the whole evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clip_pacl.data.folders import image_files
from clip_pacl.data.images import IMAGE_EXTENSIONS
from clip_pacl.data.rows import LabelRow
from clip_pacl.data.tables import read_label_rows
from clip_pacl.errors import DataError


def read_class_folders(root: str | Path, class_names: Sequence[str] | None = None) -> list[LabelRow]:
    """Rows of an ImageFolder-style tree, `root/<class>/<image>` (recursively), labelled by folder name.

    When `class_names` are given and no folder is named after a class but the counts match, folders are
    class ids in sorted order, torchvision's convention: ImageNet's `val/n01440764/...` with
    `--classes imagenet` then needs no label file.
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    names = [f.name for f in folders]
    by_position = class_names is not None and not set(names) & set(class_names) and len(names) == len(class_names)
    rows = []
    for i, folder in enumerate(folders):
        label = str(i) if by_position else folder.name
        rows += [LabelRow(path, label) for path in image_files(folder)]
    if not rows:
        raise DataError(f"the class folders of {root} hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return rows


def read_labelled(path: str | Path, class_names: Sequence[str] | None = None, *, image_key: str = "image",
                  label_key: str = "label") -> list[LabelRow]:
    """(image, label) rows of a folder of class folders or of a CSV/TSV/JSONL table: what `--data`, `--train`
    and `--test` of the classification commands accept."""
    path = Path(path)
    if path.is_dir():
        return read_class_folders(path, class_names)
    return read_label_rows(path, image_key=image_key, label_key=label_key)
