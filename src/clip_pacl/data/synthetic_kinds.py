"""Generated image-caption sets of other kinds than the built-in shapes, for judging training recipes on data
nobody tuned them for (benchmarks/recipes.py).

- counts: 2 to 5 copies of one shape in one colour on a muted texture; "three red squares". Zero-shot classes
  are the count words: a model has to tell how many, not only what.
- patterns: the whole frame is a two-colour pattern (stripes, checks, dots, waves, rings, zigzags) at a random
  scale, angle and phase; "red and blue stripes". No objects: classes are textures, colours vary freely.

Each writes the caption and label formats users bring:

```
DIR/images/000000.png ...        RGB PNGs
DIR/captions.csv                 image,caption   (captions_per_image different phrasings per image)
DIR/labels.csv                   image,label     (label: a line of classes.txt)
DIR/classes.txt                  the zero-shot class names
DIR/templates.txt                prompt templates, one per line, each with {} for the class name
DIR/objects.jsonl                what was drawn, per image (label, colours, shape, centres, ...), and its captions
DIR/{captions,labels}_heldout.csv   with heldout=N: N more images, in no other file
```

As for shapes, image i depends only on (seed, i) (and the kind), so the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clip_pacl.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SUPERSAMPLE,
    ShapeObject,
    SyntheticInfo,
    _background,
    check_sizes,
    generate_synthetic,
    jittered_rgb,
    paint,
    place_discs,
    write_csv,
)
from clip_pacl.errors import DataError

COUNT_WORDS = ("two", "three", "four", "five")
COUNT_RADIUS = (0.08, 0.12)  # fraction of the side: five fit in any frame
PATTERNS = ("stripes", "checks", "dots", "waves", "rings", "zigzags")
PATTERN_ADJECTIVES = {"stripes": "striped", "checks": "checkered", "dots": "polka-dot", "waves": "wavy",
                      "rings": "ringed", "zigzags": "zigzag"}


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


@dataclass(frozen=True)
class KindSample:
    """One generated image of a task kind (`KINDS`): its class label, every caption phrasing that fits it, and
    the kind's own details (`meta`, written to the dataset's table)."""

    image: np.ndarray  # (H, W, 3) uint8
    label: str
    captions: tuple[str, ...]  # every phrasing; the writer picks captions_per_image of them
    meta: dict


def _rng(kind: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, KINDS_SALT[kind]])


def count_captions(count: str, color: str, shape: str, background: str) -> list[str]:
    """Every phrasing names the count, the colour and the shape."""
    things = f"{color} {plural(shape)}"
    return [f"{count} {things}", f"a photo of {count} {things}",
            f"{count} {things} on a {BACKGROUNDS[background]} background", f"{count} shapes, all {things}"]


def make_count_sample(seed: int, index: int, image_size: int) -> KindSample:
    rng = _rng("counts", seed, index)
    n = int(rng.integers(2, 2 + len(COUNT_WORDS)))
    shape = list(SHAPES)[int(rng.integers(0, len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(0, len(COLORS)))]
    placed = None
    while placed is None:  # 100 tries per object almost always fit five; a retry draws new positions
        placed = place_discs(rng, image_size, [COUNT_RADIUS] * n)
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    canvas = _background(rng, image_size, background)  # (H, W, 3) float
    objects = [ShapeObject(shape, color, "small", (round(cx, 3), round(cy, 3)), round(r, 3), jittered_rgb(rng, color))
               for cx, cy, r in placed]
    for obj in objects:
        paint(canvas, obj)
    count = COUNT_WORDS[n - 2]
    meta = {"count": n, "shape": shape, "color": color, "background": background,
            "centers": [o.center for o in objects], "radii": [o.radius for o in objects]}
    return KindSample(np.round(canvas).astype(np.uint8), count, tuple(count_captions(count, color, shape, background)),
                      meta)


def _pattern_field(rng: np.random.Generator, pattern: str, size: int) -> np.ndarray:
    """Fraction of each pixel in the pattern's foreground colour, (H, W) in [0, 1], anti-aliased by supersampling."""
    s = SUPERSAMPLE
    yy, xx = (np.mgrid[0 : size * s, 0 : size * s].astype(np.float32) + 0.5) / (size * s)  # (sH, sW) in [0, 1)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)  # rotated coordinates
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    period = rng.uniform(0.18, 0.32)
    phase = rng.uniform(0, 1)
    if pattern == "stripes":
        fg = np.sin(2 * math.pi * (u / period + phase)) > 0
    elif pattern == "checks":
        fg = (np.floor(u / period + phase) + np.floor(v / period + phase)) % 2 == 0
    elif pattern == "dots":
        du = (u / period + phase) % 1 - 0.5
        dv = (v / period + phase) % 1 - 0.5
        fg = np.hypot(du, dv) < rng.uniform(0.25, 0.35)
    elif pattern == "waves":
        wave = rng.uniform(0.06, 0.1) * np.sin(2 * math.pi * u / rng.uniform(0.35, 0.6))
        fg = np.sin(2 * math.pi * ((v + wave) / period + phase)) > 0
    elif pattern == "rings":
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        fg = np.sin(2 * math.pi * (np.hypot(xx - cx, yy - cy) / period + phase)) > 0
    else:  # zigzags: stripes displaced by a triangle wave
        tooth = rng.uniform(0.2, 0.35)
        tri = 2 * np.abs((u / tooth) % 1 - 0.5)  # (sH, sW) in [0, 1]
        fg = np.sin(2 * math.pi * ((v + 0.12 * tri) / period + phase)) > 0
    return fg.astype(np.float32).reshape(size, s, size, s).mean(axis=(1, 3))


def pattern_captions(pattern: str, fg: str, bg: str) -> list[str]:
    """Every phrasing names the pattern and both colours (foreground first)."""
    adjective = PATTERN_ADJECTIVES[pattern]
    return [f"{fg} and {bg} {pattern}", f"a {adjective} pattern in {fg} and {bg}",
            f"{fg} {pattern} on a {bg} background", f"a close-up of a {fg} and {bg} {adjective} texture"]


def make_pattern_sample(seed: int, index: int, image_size: int) -> KindSample:
    rng = _rng("patterns", seed, index)
    pattern = PATTERNS[int(rng.integers(0, len(PATTERNS)))]
    fg, bg = (list(COLORS)[int(i)] for i in rng.choice(len(COLORS), size=2, replace=False))
    cover = _pattern_field(rng, pattern, image_size)[..., None]  # (H, W, 1)
    fg_rgb, bg_rgb = (np.array(jittered_rgb(rng, c), dtype=np.float32) for c in (fg, bg))
    image = np.round(bg_rgb * (1 - cover) + fg_rgb * cover).astype(np.uint8)
    meta = {"pattern": pattern, "foreground": fg, "background": bg, "coverage": round(float(cover.mean()), 4)}
    return KindSample(image, pattern, tuple(pattern_captions(pattern, fg, bg)), meta)


def _count_templates() -> list[str]:
    return [f"{{}} {color} {plural(shape)}" for color in COLORS for shape in SHAPES]


def _pattern_templates() -> list[str]:
    return [f"{fg} and {bg} {{}}" for fg in COLORS for bg in COLORS if fg != bg]


# kind -> (sample maker, class names, zero-shot templates: the class prompt averages over what the class leaves
# open, as the shapes set's "a red {}" templates do over colours)
KINDS: dict[str, tuple[Callable[[int, int, int], KindSample], tuple[str, ...], Callable[[], list[str]]]] = {
    "counts": (make_count_sample, COUNT_WORDS, _count_templates),
    "patterns": (make_pattern_sample, PATTERNS, _pattern_templates),
}
KINDS_SALT = {"counts": 1, "patterns": 2}


def generate(kind: str, out_dir: str | Path, n: int, seed: int = 0, image_size: int = 64, *,
             captions_per_image: int = 1, heldout: int = 0, progress: bool = False, **shape_options) -> SyntheticInfo:
    """Write a generated set of any kind: "shapes" (`synthetic.generate_synthetic`, which alone takes
    `shape_options` such as max_objects) or one of KINDS."""
    if kind == "shapes":
        return generate_synthetic(out_dir, n, seed, image_size, captions_per_image=captions_per_image,
                                  heldout=heldout, progress=progress, **shape_options)
    if kind not in KINDS:
        raise DataError(f"unknown synthetic kind {kind!r} (known: shapes, {', '.join(KINDS)})")
    check_sizes(n, heldout, image_size, captions_per_image)
    return generate_kind(kind, out_dir, n, seed, image_size, captions_per_image=captions_per_image,
                         heldout=heldout, progress=progress)


def generate_kind(kind: str, out_dir: str | Path, n: int, seed: int, image_size: int, *, captions_per_image: int,
                  heldout: int, progress: bool) -> SyntheticInfo:
    """Write a set of this kind (see the module docstring); arguments are checked by `generate`."""
    make, classes, templates = KINDS[kind]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    (out / "templates.txt").write_text("\n".join(templates()) + "\n")
    rows: dict[str, list[tuple[str, str]]] = {"captions": [], "labels": []}
    held: dict[str, list[tuple[str, str]]] = {"captions": [], "labels": []}
    with open(out / "objects.jsonl", "w") as meta:
        for i in tqdm(range(n + heldout), desc=f"synthetic {kind}", unit="img", disable=not progress):
            sample = make(seed, i, image_size)
            rel = f"images/{i:06d}.png"
            Image.fromarray(sample.image).save(out / rel, compress_level=1)
            pick = np.random.default_rng([seed, i, KINDS_SALT[kind], 1]).choice(
                len(sample.captions), size=min(captions_per_image, len(sample.captions)), replace=False)
            captions = [sample.captions[int(j)] for j in pick]
            split = rows if i < n else held
            split["captions"].extend((rel, c) for c in captions)
            split["labels"].append((rel, sample.label))
            meta.write(json.dumps({"image": rel, "split": "train" if i < n else "heldout", "label": sample.label,
                                   **sample.meta, "captions": captions}) + "\n")
    for name, header in (("captions", ("image", "caption")), ("labels", ("image", "label"))):
        write_csv(out / f"{name}.csv", header, rows[name])
        if heldout:
            write_csv(out / f"{name}_heldout.csv", header, held[name])
    return SyntheticInfo(out_dir=out, n_images=n, n_single_object=0, image_size=image_size, seed=seed,
                         captions=out / "captions.csv", shapes=None, colors=None, objects=out / "objects.jsonl",
                         segmentation=None, segmentation_colors=None, labels=out / "labels.csv",
                         label_classes=classes, templates=out / "templates.txt", kind=kind, n_heldout=heldout,
                         captions_heldout=out / "captions_heldout.csv" if heldout else None,
                         labels_heldout=out / "labels_heldout.csv" if heldout else None)
