"""Semantic-segmentation datasets: our folder format and the usual benchmarks, detected from the directory.

Every dataset yields (RGB PIL image, mask (H, W) int64) with 255 = ignore, and ships its class names
(written to be good prompts: "dining table", not "diningtable"). Layouts (the benchmarks as mmseg prepares them):

  ours          DIR/images/*, DIR/masks/<stem>.png, DIR/classes.txt (line i = class i; "background" is background)
  voc           VOC2012/JPEGImages, SegmentationClass/*.png, ImageSets/Segmentation/val.txt (21 classes with background)
  context59     VOC2010/JPEGImages, SegmentationClassContext/*.png, ImageSets/SegmentationContext/val.txt
                (59 classes; label 0 is ignored and the rest shift down by one, mmseg's reduce_zero_label)
  cocostuff     images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png (171 classes)
  ade20k        ADEChallengeData2016/images/validation, annotations/validation (150 classes; reduce_zero_label)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clip_pacl.data import IMAGE_EXTENSIONS, load_image
from clip_pacl.data.images import SUPPORTED_FORMATS
from clip_pacl.errors import DataError

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)
CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall", "water", "window", "wood",
)
COCOSTUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling",
    "ceiling tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk", "dirt", "door", "fence",
    "marble floor", "floor", "stone floor", "tile floor", "wood floor", "flower", "fog", "food", "fruit",
    "furniture", "grass", "gravel", "ground", "hill", "house", "leaves", "light", "mat", "metal", "mirror", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky", "skyscraper", "snow", "solid", "stairs", "stone", "straw", "structural", "table", "tent", "textile",
    "towel", "tree", "vegetable", "brick wall", "concrete wall", "wall", "wall panel", "stone wall", "tile wall",
    "wood wall", "water", "waterdrops", "window blind", "window", "wood",
)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)


@dataclass(frozen=True)
class _Layout:
    name: str
    image_dir: str
    mask_dir: str
    mask_suffix: str  # mask file = image stem + this
    classes: tuple[str, ...]
    split_file: str | None = None  # list of stems; None = every image in image_dir
    reduce_zero_label: bool = False


_LAYOUTS = (
    _Layout("voc", "JPEGImages", "SegmentationClass", ".png", VOC_CLASSES, "ImageSets/Segmentation/val.txt"),
    _Layout("context59", "JPEGImages", "SegmentationClassContext", ".png", CONTEXT59_CLASSES,
            "ImageSets/SegmentationContext/val.txt", reduce_zero_label=True),
    _Layout("cocostuff", "images/val2017", "annotations/val2017", "_labelTrainIds.png", COCOSTUFF_CLASSES),
    _Layout("ade20k", "images/validation", "annotations/validation", ".png", ADE20K_CLASSES, reduce_zero_label=True),
)
# Where a benchmark's root usually sits below the directory a user points at.
_ROOT_CANDIDATES = ("", "VOC2012", "VOCdevkit/VOC2012", "VOC2010", "VOCdevkit/VOC2010", "ADEChallengeData2016",
                    "coco_stuff164k")


class SegmentationDataset:
    """(image, mask) pairs; `class_names[i]` names label i; `background_index` is the background class or None."""

    def __init__(self, name: str, pairs: list[tuple[Path, Path]], class_names: tuple[str, ...],
                 reduce_zero_label: bool = False):
        if not pairs:
            raise DataError(f"the {name} segmentation dataset has no images")
        self.name = name
        self.pairs = pairs
        self.class_names = class_names
        self.reduce_zero_label = reduce_zero_label
        names = [c.strip().lower() for c in class_names]
        self.background_index = names.index("background") if "background" in names else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path)
        mask = load_mask(mask_path, self.reduce_zero_label)
        if mask.shape != (image.height, image.width):
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{image.width}x{image.height}")
        return image, mask


def load_mask(path: Path, reduce_zero_label: bool = False) -> np.ndarray:
    """A label PNG as (H, W) int64; palette PNGs (VOC) keep their indices. `reduce_zero_label`: 0 -> 255, k -> k-1."""
    try:
        with Image.open(path, formats=SUPPORTED_FORMATS) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"mask {path} has mode {img.mode}; expected a single-channel label image")
            mask = np.asarray(img, dtype=np.int64)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder error on a bad file (see data/images.py)
        raise DataError(f"mask {path} cannot be read ({' '.join(str(e).split())})") from None
    if reduce_zero_label:
        mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
        mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
    return mask


def open_segmentation_dataset(path: str | Path) -> SegmentationDataset:
    """Detect the layout under `path` (ours, or a benchmark) and list its (image, mask) pairs."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"segmentation data {root} does not exist")
    if not root.is_dir():
        raise DataError(f"segmentation data {root} is not a directory")
    if (root / "segmentation" / "classes.txt").is_file() and not (root / "classes.txt").exists():
        root = root / "segmentation"  # a synthetic-set directory: its segmentation part
    if (root / "classes.txt").is_file():
        return _open_folder(root)
    for sub in _ROOT_CANDIDATES:
        base = root / sub
        for layout in _LAYOUTS:
            if (base / layout.image_dir).is_dir() and (base / layout.mask_dir).is_dir():
                return _open_layout(base, layout)
    raise DataError(f"{root} is not a segmentation dataset clip-pacl knows (expected classes.txt + images/ + masks/, "
                    "or a VOC, Pascal Context, COCO-Stuff or ADE20K layout)")


def _open_folder(root: Path) -> SegmentationDataset:
    classes = tuple(line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip())
    if not classes:
        raise DataError(f"{root / 'classes.txt'} lists no classes")
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise DataError(f"{root} has classes.txt but no {sub}/ folder")
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.suffix.lower() == ".png"}
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise DataError(f"{len(missing)} images in {root / 'images'} have no mask in {root / 'masks'} "
                        f"(e.g. {missing[0]})")
    return SegmentationDataset("folder", [(p, masks[p.stem]) for p in images], classes)


def _open_layout(base: Path, layout: _Layout) -> SegmentationDataset:
    image_dir, mask_dir = base / layout.image_dir, base / layout.mask_dir
    if layout.split_file is not None and (base / layout.split_file).is_file():
        stems = [s.strip() for s in (base / layout.split_file).read_text().splitlines() if s.strip()]
        images = {s: _find_image(image_dir, s) for s in stems}
    else:
        suffix = layout.mask_suffix
        stems = sorted(p.name[: -len(suffix)] for p in mask_dir.iterdir() if p.name.endswith(suffix))
        images = {s: _find_image(image_dir, s) for s in stems}
    pairs = []
    for stem in stems:
        mask = mask_dir / f"{stem}{layout.mask_suffix}"
        if images[stem] is None or not mask.is_file():
            raise DataError(f"{layout.name}: '{stem}' has no image in {image_dir} or no mask {mask}")
        pairs.append((images[stem], mask))
    return SegmentationDataset(layout.name, pairs, layout.classes, layout.reduce_zero_label)


def _find_image(image_dir: Path, stem: str) -> Path | None:
    for ext in (".jpg", ".png", ".jpeg", ".JPG"):
        if (image_dir / f"{stem}{ext}").is_file():
            return image_dir / f"{stem}{ext}"
    return None
