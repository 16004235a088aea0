"""A segmentation set of another kind than the built-in one: one or two LARGE objects on FLAT backgrounds.

    python benchmarks/make_flat_objects.py --out DIR --n 200 --seed 1

The built-in synthetic set draws small-to-large objects (radius 10-25% of the side, 1-3 of them) on textured
backgrounds. Here objects have radius 24-40% of the side (1-2 of them) and the background is one muted colour,
so objects cover about 21% of an image's pixels against 9% there (edges excluded): a background rule tuned,
or calibrated, on the built-in set's foreground share meets another share and other backgrounds here. Masks are
labelled by colour, in the built-in `segmentation_colors/` format (classes.txt, templates.txt, images/, masks/;
255 = partly covered edge pixels), so `eval segmentation` and the benchmarks read it as they read the built-in set.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

from clip_pacl.data.synthetic import COLORS, IGNORE_INDEX, SHAPES, ShapeObject, _coverage, _muted_color


def make_image(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` (H, W, 3) uint8 and its colour mask (H, W) uint8."""
    rng = np.random.default_rng([seed, index, 7])
    canvas = np.broadcast_to(_muted_color(rng), (size, size, 3)).copy()  # (H, W, 3) flat
    mask = np.zeros((size, size), dtype=np.uint8)
    colors, shapes = list(COLORS), list(SHAPES)
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, 3))):
        r = float(rng.uniform(0.24, 0.40)) * size
        for _ in range(100):
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
            if all(math.hypot(cx - px, cy - py) >= r + pr + 2 for px, py, pr in placed):
                break
        else:
            continue  # no room for a second large object
        placed.append((cx, cy, r))
        color = colors[int(rng.integers(0, len(colors)))]
        obj = ShapeObject(shapes[int(rng.integers(0, len(shapes)))], color, "large", (cx, cy), r, COLORS[color])
        ys, xs, cov = _coverage(obj, size)
        canvas[ys, xs] = canvas[ys, xs] * (1 - cov[..., None]) + np.array(obj.rgb, np.float32) * cov[..., None]
        class_id = colors.index(color) + 1
        mask[ys, xs] = np.where(cov >= 1.0, class_id, np.where(cov > 0, IGNORE_INDEX, mask[ys, xs]))
    return np.round(canvas).astype(np.uint8), mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="segmentation dataset dir to write")
    ap.add_argument("--n", type=int, default=200, help="number of images")
    ap.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    ap.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    args = ap.parse_args()
    for sub in ("images", "masks"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    (args.out / "classes.txt").write_text("\n".join(("background", *COLORS)) + "\n")
    (args.out / "templates.txt").write_text("".join(f"a {{}} {s}\n" for s in SHAPES))
    for i in range(args.n):
        image, mask = make_image(args.seed, i, args.image_size)
        Image.fromarray(image).save(args.out / "images" / f"{i:06d}.png")
        Image.fromarray(mask, mode="L").save(args.out / "masks" / f"{i:06d}.png")
    print(f"wrote {args.n} images to {args.out}")


if __name__ == "__main__":
    main()
