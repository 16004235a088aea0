"""The built-in synthetic dataset: coloured shapes on textured backgrounds, with captions, labels and masks.

It exists so that every part of the pipeline (training, zero-shot, retrieval, segmentation, the demo)
can run end to end on a laptop in minutes, with no download. It writes exactly the formats users
bring, so nothing downstream knows it is synthetic:

```
DIR/images/000000.png ...        RGB PNGs, image_size x image_size
DIR/captions.csv                 image,caption   (paths relative to DIR; captions_per_image rows per image)
DIR/shapes.csv                   image,label     (only images with exactly one object: its shape)
DIR/colors.csv                   image,label     (the same images: its colour)
DIR/objects.jsonl                one JSON object per image: background, objects (shape, colour, size,
                                 centre, radius, rgb), captions; for inspection and tests
DIR/segmentation/images/         the same pixels as images/ (hard links when possible, else copies)
DIR/segmentation/masks/          PNG, mode L: pixel = class id, 0 = background, 255 = ignore
DIR/segmentation/classes.txt     line 0 = "background", then one line per shape class (in `shapes` order)
DIR/segmentation/templates.txt   prompt templates for those classes, "a red {}" ...: one per colour, so the
                                 class prompt averages over colours like the captions describe objects
DIR/segmentation_colors/         the same images, masks labelled by colour instead of shape (classes.txt:
                                 "background", then the colours; templates.txt: "a {} circle" ... per shape)
DIR/{captions,shapes,colors}_heldout.csv   with heldout=N: the rows of N more images, kept out of the files above
```

`kind="counts"` or `"patterns"` writes sets of other structure instead (data/synthetic_kinds.py): how many
objects, or which two-colour pattern, with labels.csv + classes.txt + templates.txt for zero-shot.

Two label sets because they ask different things of a model: an object's colour is visible in every one
of its patches, its shape only across several. A small CLIP trained here localises colour long before shape.

Images are drawn at 4x resolution and box-filtered down, so edges are anti-aliased like real photos.
A mask pixel gets an object's class only when the object covers it completely, background only when
no object touches it; partly covered edge pixels are 255 (ignore). Objects never overlap (a 2-pixel
gap), so every labelled pixel has exactly the object's colour.

Object colours are saturated or extreme (white, black); backgrounds are muted mid-grey tints
(noise, stripes, gradients, checkers), so "a white circle" is never confused with the background.
Image i depends only on (seed, i): the same seed gives byte-identical files, and a larger `n`
extends a smaller set rather than reshuffling it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from clip_pacl.errors import DataError

SUPERSAMPLE = 4
IGNORE_INDEX = 255

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

# Radius as a fraction of the image side; the caption's size word matches the drawn size.
SIZES: dict[str, tuple[float, float]] = {"small": (0.10, 0.14), "medium": (0.15, 0.19), "large": (0.20, 0.25)}

BACKGROUNDS = {"noise": "noisy", "stripes": "striped", "gradient": "gradient", "checker": "checkered"}


def _regular_polygon(k: int, start: float, radius: float = 1.0) -> np.ndarray:
    angles = start + np.arange(k) * 2 * math.pi / k
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular_polygon(points, -math.pi / 2)
    inner_pts = _regular_polygon(points, -math.pi / 2 + math.pi / points, inner)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.34) -> np.ndarray:
    a, b = arm, 0.92
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                     (-a, a), (-b, a), (-b, -a), (-a, -a)])


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.linalg.norm(pts, axis=1).max()


# Unit-radius outlines (every vertex within the unit circle), y pointing down; None = drawn as an ellipse.
SHAPES: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.78,
    "triangle": _regular_polygon(3, -math.pi / 2),
    "star": _star(),
    "hexagon": _regular_polygon(6, 0.0),
    "cross": _cross(),
    "heart": _heart(),
    "diamond": _regular_polygon(4, -math.pi / 2),
}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape of a synthetic image: its class, colour and size words, where it is (pixels) and the
    RGB it was painted with."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image with its segmentation masks (shape and colour classes), the shapes drawn on it,
    the background's name and the captions that describe it."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: shape class id, 0 background, 255 ignore
    color_mask: np.ndarray  # (H, W) uint8: colour class id (index in `colors` + 1), same 0 and 255 pixels
    objects: tuple[ShapeObject, ...]
    background: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class SyntheticInfo:
    """Where everything was written; `to_dict()` is what `clip-pacl data synthetic --json` prints."""

    out_dir: Path
    n_images: int
    n_single_object: int
    image_size: int
    seed: int
    captions: Path
    shapes: Path | None  # None: the file is the shapes kind's only
    colors: Path | None
    objects: Path
    segmentation: Path | None
    segmentation_colors: Path | None
    classes: tuple[str, ...] = field(default_factory=tuple)
    color_names: tuple[str, ...] = field(default_factory=tuple)
    # Zero-shot classification on this set: labels (shapes.csv here) with its class names and prompt templates
    labels: Path | None = None
    label_classes: tuple[str, ...] = field(default_factory=tuple)
    templates: Path | None = None
    kind: str = "shapes"
    n_heldout: int = 0  # images written after the n training images, listed only in the *_heldout.csv files
    captions_heldout: Path | None = None
    labels_heldout: Path | None = None

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ShapeObject, with_size: bool = False) -> str:
    words = f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"
    return f"{_article(words)} {words}"


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is relative to `b`, along the axis where they are further apart."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def _position(obj: ShapeObject, image_size: int) -> str:
    """Where the object is in the frame, as a phrase: "in the top left corner", "at the bottom", ..."""
    third = image_size / 3
    row = ("top", "middle", "bottom")[min(int(obj.center[1] // third), 2)]
    col = ("left", "center", "right")[min(int(obj.center[0] // third), 2)]
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"in the {row} {col} corner"


def caption_templates(objects: Sequence[ShapeObject], background: str, image_size: int) -> list[str]:
    """All phrasings for one image; each mentions every object's colour and shape (and relations for 2+)."""
    bg = BACKGROUNDS[background]
    if len(objects) == 1:
        (o,) = objects
        return [
            _phrase(o),
            f"a photo of {_phrase(o, with_size=True)}",
            f"{_phrase(o, with_size=True)} on a {bg} background",
            f"a picture of {_phrase(o)} {_position(o, image_size)}",
        ]
    if len(objects) == 2:
        a, b = objects
        return [
            f"{_phrase(a)} {_relation(a, b)} {_phrase(b)}",
            f"{_phrase(b)} {_relation(b, a)} {_phrase(a)}",
            f"two shapes: {_phrase(a)} and {_phrase(b)}",
            f"a photo of {_phrase(a, with_size=True)} and {_phrase(b, with_size=True)} on a {bg} background",
        ]
    a, b, c = objects
    return [
        f"{_phrase(a)} {_relation(a, b)} {_phrase(b)}, and {_phrase(c)} {_relation(c, b)} the {b.shape}",
        f"three shapes: {_phrase(a)}, {_phrase(b)} and {_phrase(c)}",
        f"a photo of {_phrase(a)}, {_phrase(b)} and {_phrase(c)} on a {bg} background",
    ]


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    level = rng.uniform(85, 170)
    return (level + rng.uniform(-18, 18, size=3)).astype(np.float32)  # (3,) low saturation, mid brightness


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A muted texture, (H, W, 3) float32 in 0..255."""
    c1, c2 = _muted_color(rng), _muted_color(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (H, W) each, in [0, 1)
    if kind == "noise":
        grain = 9 * rng.standard_normal((size, size, 1), dtype=np.float32)  # luminance noise
        img = c1 + grain + 3 * rng.standard_normal((size, size, 3), dtype=np.float32)
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.25)
        phase = np.sin(np.float32(2 * math.pi / period) * (xx * math.cos(angle) + yy * math.sin(angle)))
        img = c1 + (c2 - c1) * ((phase[..., None] + 1) / 2)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1 + (c2 - c1) * t[..., None]
    else:  # checker
        cells = int(rng.integers(3, 9))
        board = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2)[..., None]
        img = c1 + (c2 - c1) * board
    return np.clip(img, 0, 255, out=img)


def _coverage(obj: ShapeObject, size: int) -> tuple[slice, slice, np.ndarray]:
    """Fraction of each pixel covered by the object, over its bounding box only (fast at any image size)."""
    cx, cy = obj.center
    r = obj.radius
    x0, y0 = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(math.ceil(cx + r)) + 1, size), min(int(math.ceil(cy + r)) + 1, size)
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    outline = SHAPES[obj.shape]
    ox, oy = (cx - x0) * s, (cy - y0) * s
    if outline is None:
        draw.ellipse([ox - r * s, oy - r * s, ox + r * s, oy + r * s], fill=255)
    else:
        draw.polygon([(ox + px * r * s, oy + py * r * s) for px, py in outline], fill=255)
    hi = np.asarray(canvas, dtype=np.float32) / 255.0  # (h*s, w*s)
    cov = hi.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))  # (h, w) in [0, 1]
    return slice(y0, y1), slice(x0, x1), cov


def place_discs(rng: np.random.Generator, size: int, radii: Sequence[tuple[float, float]],
                ) -> list[tuple[float, float, float]] | None:
    """Non-overlapping discs (cx, cy, r) in the frame, 2 pixels apart; radius i drawn from radii[i] (fractions
    of the side). None when 100 tries cannot fit one."""
    placed: list[tuple[float, float, float]] = []
    for lo, hi in radii:
        r = rng.uniform(lo, hi) * size
        for _ in range(100):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - px, cy - py) >= r + pr + 2 for px, py, pr in placed):
                placed.append((float(cx), float(cy), float(r)))
                break
        else:
            return None
    return placed


def paint(canvas: np.ndarray, obj: ShapeObject) -> tuple[slice, slice, np.ndarray]:
    """Draw the object (anti-aliased) onto canvas (H, W, 3) float in place; returns where and how much it covers."""
    ys, xs, cov = _coverage(obj, canvas.shape[0])
    region = canvas[ys, xs]
    canvas[ys, xs] = region * (1 - cov[..., None]) + np.array(obj.rgb, dtype=np.float32) * cov[..., None]
    return ys, xs, cov


def jittered_rgb(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    """The palette colour with a little per-object variation (+-12 per channel)."""
    return tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, size=3), 0, 255))


def make_sample(
    seed: int,
    index: int,
    image_size: int = 64,
    *,
    max_objects: int = 3,
    shapes: Sequence[str] = tuple(SHAPES),
    colors: Sequence[str] = tuple(COLORS),
    captions_per_image: int = 1,
) -> SyntheticSample:
    """Draw image `index` of the set with this seed; depends on nothing else, so sets are extendable."""
    rng = np.random.default_rng([seed, index])
    probs = np.array([0.5, 0.3, 0.2][:max_objects])
    n_obj = int(rng.choice(np.arange(1, max_objects + 1), p=probs / probs.sum()))
    size_names = list(SIZES)
    sizes = [size_names[int(i)] for i in rng.integers(0, len(size_names), size=n_obj)]
    placed = place_discs(rng, image_size, [SIZES[s] for s in sizes])
    while placed is None:  # too crowded: shrink the largest object and retry (deterministically)
        largest = max(range(n_obj), key=lambda i: size_names.index(sizes[i]))
        sizes[largest] = size_names[max(size_names.index(sizes[largest]) - 1, 0)]
        placed = place_discs(rng, image_size, [SIZES[s] for s in sizes])
    kind = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    canvas = _background(rng, image_size, kind)  # (H, W, 3) float
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    color_mask = np.zeros((image_size, image_size), dtype=np.uint8)
    objects = []
    for (cx, cy, r), size_name in zip(placed, sizes):
        shape = shapes[int(rng.integers(0, len(shapes)))]
        color = colors[int(rng.integers(0, len(colors)))]
        obj = ShapeObject(shape, color, size_name, (round(cx, 3), round(cy, 3)), round(r, 3), jittered_rgb(rng, color))
        ys, xs, cov = paint(canvas, obj)
        for target, class_id in ((mask, list(shapes).index(shape) + 1), (color_mask, list(colors).index(color) + 1)):
            target[ys, xs] = np.where(cov >= 1.0, class_id, np.where(cov > 0, IGNORE_INDEX, target[ys, xs]))
        objects.append(obj)
    image = np.round(canvas).astype(np.uint8)
    templates = caption_templates(objects, kind, image_size)
    picks = rng.choice(len(templates), size=min(captions_per_image, len(templates)), replace=False)
    return SyntheticSample(image, mask, color_mask, tuple(objects), kind, tuple(templates[int(i)] for i in picks))


def generate_synthetic(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    *,
    max_objects: int = 3,
    captions_per_image: int = 1,
    shapes: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    heldout: int = 0,
    progress: bool = False,
) -> SyntheticInfo:
    """Write `n` training images (plus `heldout` held-out ones) with captions and labels under `out_dir`.

    The shapes set (captions, labels and masks, see the module docstring); `synthetic_kinds.generate` writes
    this or a set of another kind (object counts, two-colour patterns). Held-out images are
    images n .. n + heldout - 1 of the same stream, written to images/ like the rest but listed only in
    captions_heldout.csv and the labels' *_heldout.csv files; heldout=0 writes exactly the files it always did."""
    check_sizes(n, heldout, image_size, captions_per_image)
    shapes = tuple(shapes or SHAPES)
    colors = tuple(colors or COLORS)
    if not 1 <= max_objects <= 3:
        raise DataError(f"max_objects must be 1, 2 or 3 (got {max_objects})")
    for kind, chosen, known in (("shape", shapes, SHAPES), ("colour", colors, COLORS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise DataError(f"unknown {kind} {unknown[0]!r} (known: {', '.join(known)})")

    out = Path(out_dir)
    seg, seg_colors = out / "segmentation", out / "segmentation_colors"
    classes = _write_segmentation_dirs(out, seg, seg_colors, shapes, colors)

    rows: dict[str, list[tuple[str, str]]] = {name: [] for name in ("captions", "shapes", "colors")}
    held: dict[str, list[tuple[str, str]]] = {name: [] for name in rows}
    with open(out / "objects.jsonl", "w") as meta:
        for i in tqdm(range(n + heldout), desc="synthetic", unit="img", disable=not progress):
            sample = make_sample(seed, i, image_size, max_objects=max_objects, shapes=shapes, colors=colors,
                                 captions_per_image=captions_per_image)
            name = f"{i:06d}.png"
            image_path = out / "images" / name
            Image.fromarray(sample.image).save(image_path, compress_level=1)
            for seg_dir, seg_mask in ((seg, sample.mask), (seg_colors, sample.color_mask)):
                _link_or_copy(image_path, seg_dir / "images" / name)
                Image.fromarray(seg_mask, mode="L").save(seg_dir / "masks" / name, compress_level=1)
            rel = f"images/{name}"
            split = rows if i < n else held
            split["captions"].extend((rel, c) for c in sample.captions)
            if len(sample.objects) == 1:
                split["shapes"].append((rel, sample.objects[0].shape))
                split["colors"].append((rel, sample.objects[0].color))
            record = {"image": rel, "background": sample.background, "objects": [asdict(o) for o in sample.objects],
                      "captions": list(sample.captions)}
            meta.write(json.dumps(record if i < n else {**record, "split": "heldout"}) + "\n")

    for name, table in rows.items():
        write_csv(out / f"{name}.csv", ("image", "caption" if name == "captions" else "label"), table)
        if heldout:
            write_csv(out / f"{name}_heldout.csv", ("image", "caption" if name == "captions" else "label"),
                      held[name])
    return SyntheticInfo(out_dir=out, n_images=n, n_single_object=len(rows["shapes"]), image_size=image_size,
                         seed=seed, captions=out / "captions.csv", shapes=out / "shapes.csv",
                         colors=out / "colors.csv", objects=out / "objects.jsonl", segmentation=seg,
                         segmentation_colors=seg_colors, classes=classes, color_names=colors,
                         labels=out / "shapes.csv", label_classes=shapes, templates=seg / "templates.txt",
                         n_heldout=heldout, captions_heldout=out / "captions_heldout.csv" if heldout else None,
                         labels_heldout=out / "shapes_heldout.csv" if heldout else None)


def check_sizes(n: int, heldout: int, image_size: int, captions_per_image: int) -> None:
    """One-line DataErrors for sizes no generated set can have."""
    if n < 1:
        raise DataError(f"the synthetic set needs at least 1 image (got n={n})")
    if heldout < 0:
        raise DataError(f"heldout must be >= 0 (got {heldout})")
    if image_size < 16:
        raise DataError(f"synthetic images must be at least 16 pixels wide (got {image_size})")
    if captions_per_image < 1:
        raise DataError(f"captions_per_image must be at least 1 (got {captions_per_image})")


def _write_segmentation_dirs(out: Path, seg: Path, seg_colors: Path, shapes: Sequence[str],
                             colors: Sequence[str]) -> tuple[str, ...]:
    """The folders, classes.txt and templates.txt of both segmentation sets; returns the shape set's classes."""
    for d in (out / "images", seg / "images", seg / "masks", seg_colors / "images", seg_colors / "masks"):
        d.mkdir(parents=True, exist_ok=True)
    classes = ("background", *shapes)
    (seg / "classes.txt").write_text("\n".join(classes) + "\n")
    (seg / "templates.txt").write_text("".join(f"{_article(c)} {c} {{}}\n" for c in colors))
    (seg_colors / "classes.txt").write_text("\n".join(("background", *colors)) + "\n")
    (seg_colors / "templates.txt").write_text("".join(f"a {{}} {s}\n" for s in shapes))
    return classes


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(src, dst)


def write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
