"""COCO captions (`captions_train2017.json` + its image folder), one row per caption (about 5 per image)."""

from __future__ import annotations

import json
from pathlib import Path

from clip_pacl.data.images import locate_image_dir
from clip_pacl.data.rows import CaptionRow
from clip_pacl.errors import DataError


def is_coco_captions(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("annotations"), list) and isinstance(data.get("images"), list)


def read_coco_captions(path: Path, images_dir: Path | None = None) -> list[CaptionRow]:
    """Rows of a COCO captions file. The images are looked for in `train2017/` (the split in the file
    name) beside the json, beside its `annotations/` folder, or under `images/`, unless `images_dir`."""
    if not path.is_file():
        raise DataError(f"COCO captions file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not is_coco_captions(data):
        raise DataError(f"{path.name} is not a COCO captions file (it needs 'images' and 'annotations' lists)")
    try:
        file_names = {img["id"]: img["file_name"] for img in data["images"]}
        pairs = [(ann["image_id"], ann["caption"]) for ann in data["annotations"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path.name} has a COCO entry without {e}") from None
    if not pairs:
        raise DataError(f"{path.name} has no captions")
    split = path.stem.split("_", 1)[1] if path.stem.startswith("captions_") else path.stem
    here, above = path.parent, path.parent.parent
    candidates = [here / split, above / split, above / "images" / split, here / "images" / split, here,
                  here / "images"]
    first = next((file_names.get(image_id) for image_id, _ in pairs), None)
    if first is None:
        raise DataError(f"{path.name}: annotation for image id {pairs[0][0]} has no entry in 'images'")
    root = locate_image_dir(path, first, candidates, images_dir)
    rows = []
    for image_id, caption in pairs:
        if image_id not in file_names:
            raise DataError(f"{path.name}: annotation for image id {image_id} has no entry in 'images'")
        rows.append(CaptionRow(root / file_names[image_id], " ".join(str(caption).split())))
    return rows
