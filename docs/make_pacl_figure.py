"""Side-by-side figure for the README: image | ground truth | raw patches | MaskCLIP | PACL, one row per image.

    python docs/make_pacl_figure.py --clip CLIP_DIR --pacl PACL_DIR --data SEG_DIR --out docs/pacl_compare.png \
        [--images 0 1 2 3] [--template T ...] [--thresholds patch=0.5 maskclip=none pacl=0.2]

Both models segment with the dataset's class names only (the same call as `clip-pacl eval segmentation`),
with the dataset's templates.txt as prompts when it has one, each method at its own background threshold
(none: background by its prompt). The drawing is `clip_pacl.segmentation.figure.comparison_figure`, which the
demo's report uses too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import clip_pacl
from clip_pacl.data.segmentation import open_segmentation_dataset
from clip_pacl.segmentation.evaluate import dataset_templates
from clip_pacl.segmentation.figure import FigureColumn, comparison_figure


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
    thresholds = {"patch": None, "maskclip": None, "pacl": None}
    for spec in args.thresholds:
        method, _, value = spec.partition("=")
        if method not in thresholds or not value:
            parser.error(f"bad --thresholds entry {spec!r} (want patch=F, maskclip=F or pacl=F)")
        thresholds[method] = None if value.lower() == "none" else float(value)
    columns = [FigureColumn("CLIP patches", clip, "patch", thresholds["patch"]),
               FigureColumn("MaskCLIP", clip, "maskclip", thresholds["maskclip"]),
               FigureColumn("PACL", pacl, "pacl", thresholds["pacl"])]
    figure = comparison_figure(open_segmentation_dataset(args.data), args.images, columns,
                               args.template or dataset_templates(args.data))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
