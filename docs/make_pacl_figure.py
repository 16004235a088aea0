"""Side-by-side figure for the README: image | ground truth | raw patches | MaskCLIP | PACL, one row per image.

    python docs/make_pacl_figure.py --clip CLIP_DIR --pacl PACL_DIR --data SEG_DIR --out docs/pacl_compare.png \
        [--images 0 1 2 3] [--template T ...] [--thresholds patch=0.5 maskclip=none pacl=0.2]

Both models segment with the dataset's class names only (the same call as `clip-pacl eval segmentation`),
with the dataset's templates.txt as prompts when it has one, each method at its own background threshold
(none: background by its prompt). Classes named after a colour are drawn in it (as
in every overlay); when all of them are, background is mid-grey and ignored edge pixels cyan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import clip_pacl
from clip_pacl.data.segmentation import open_segmentation_dataset
from clip_pacl.eval.segmentation import dataset_templates
from clip_pacl.segmentation.overlay import NAMED_COLORS, class_colors
from clip_pacl.segmentation.predict import NO_CLASS, segment

SCALE = 3
HEADER = 18


def colourise(labels: np.ndarray, colors: list[tuple[int, int, int]], ignore: tuple[int, int, int]) -> Image.Image:
    palette = np.array([*colors, ignore], dtype=np.uint8)  # last entry: ignore / unassigned
    index = np.where((labels == NO_CLASS) | (labels >= len(colors)), len(colors), labels)
    return Image.fromarray(palette[index])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--pacl", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--template", action="append", default=None)
    parser.add_argument("--thresholds", nargs="*", default=[], metavar="METHOD=F",
                        help="background threshold per method (patch, maskclip, pacl); 'none' or absent: none")
    args = parser.parse_args()
    clip, pacl = clip_pacl.load(args.clip).eval(), clip_pacl.load(args.pacl).eval()
    dataset = open_segmentation_dataset(args.data)
    names = list(dataset.class_names)
    thresholds = {"patch": None, "maskclip": None, "pacl": None}
    for spec in args.thresholds:
        method, _, value = spec.partition("=")
        if method not in thresholds or not value:
            parser.error(f"bad --thresholds entry {spec!r} (want patch=F, maskclip=F or pacl=F)")
        thresholds[method] = None if value.lower() == "none" else float(value)
    colors, ignore = class_colors(names), (255, 255, 255)
    if names[0] == "background" and all(n in NAMED_COLORS for n in names[1:]):  # black objects need a lighter
        colors[0], ignore = (128, 128, 128), (0, 255, 255)  # background; white ones a non-white ignore colour
    templates = args.template or dataset_templates(args.data)
    columns = ["image", "ground truth", *(f"{title} ({'prompt' if thresholds[m] is None else thresholds[m]})"
                                          for title, m in (("CLIP patches", "patch"), ("MaskCLIP", "maskclip"),
                                                           ("PACL", "pacl")))]
    rows = []
    for i in args.images:
        image, mask = dataset[i]
        panels = [image.convert("RGB"), colourise(mask, colors, ignore)]
        for model, method in ((clip, "patch"), (clip, "maskclip"), (pacl, "pacl")):
            result = segment(model, image, names, templates=templates, method=method,
                             background_threshold=thresholds[method], background="prompt")  # none: the prompt
            panels.append(colourise(result.label_map, colors, ignore))
        rows.append([p.resize((p.width * SCALE, p.height * SCALE), Image.NEAREST) for p in panels])
    w, h = rows[0][0].size
    legend_h = 16 * ((len(names) + 4) // 5) + 8
    canvas = Image.new("RGB", (w * len(columns) + 4 * (len(columns) - 1), HEADER + len(rows) * (h + 4) + legend_h),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(columns):
        draw.text((c * (w + 4) + 2, 3), title, fill=(0, 0, 0), font=font)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            canvas.paste(panel, (c * (w + 4), HEADER + r * (h + 4)))
    top = HEADER + len(rows) * (h + 4) + 4
    col_w = canvas.width // 5
    for k, (name, color) in enumerate(zip(names, colors)):
        x, y = (k % 5) * col_w + 2, top + (k // 5) * 16
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=color, outline=(0, 0, 0))
        draw.text((x + 14, y), name, fill=(0, 0, 0), font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
