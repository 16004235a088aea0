"""`clip-pacl data synthetic`: write the built-in shapes dataset (captions, labels, masks)."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.common import add_json_flag, log, print_json

COMMAND = "data synthetic"
GROUP_HELP = "dataset tools"
HELP = "write a generated dataset: the built-in shapes (captions, labels, masks), object counts or patterns"
DESCRIPTION = (
    "Write coloured shapes on textured backgrounds as images/ + captions.csv + shapes.csv + colors.csv + "
    "segmentation/{images,masks,classes.txt,templates.txt} (shape classes) + segmentation_colors/ (the same "
    "images labelled by colour): the same formats `train`, `eval` and `index` read. "
    "--kind counts (2-5 copies of one shape: 'three red squares') and --kind patterns (two-colour stripes, "
    "checks, dots, ...) write sets of other structure: images/ + captions.csv + labels.csv + classes.txt + "
    "templates.txt for `eval zeroshot`. --heldout N adds N images listed only in *_heldout.csv. "
    "The same --seed always gives byte-identical files."
)
ORDER = 90
KIND_NAMES = ("shapes", "counts", "patterns")  # shapes + data.synthetic_kinds.KINDS (not imported: the CLI starts fast)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--n", type=int, default=5000, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed; image i depends only on (seed, i)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--kind", default="shapes", choices=KIND_NAMES,
                        help="what the images show: shapes (the built-in set), counts or patterns")
    parser.add_argument("--heldout", type=int, default=0, metavar="N",
                        help="also write N held-out images, listed only in captions_heldout.csv and the labels' "
                             "*_heldout.csv")
    parser.add_argument("--max-objects", type=int, default=3, choices=(1, 2, 3),
                        help="at most this many shapes per image (--kind shapes)")
    parser.add_argument("--captions-per-image", type=int, default=1, choices=(1, 2),
                        help="caption rows per image in captions.csv (different phrasings)")
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data.synthetic_kinds import generate

    options = {"max_objects": args.max_objects} if args.kind == "shapes" else {}
    info = generate(args.kind, args.out, args.n, seed=args.seed, image_size=args.image_size,
                    captions_per_image=args.captions_per_image, heldout=args.heldout, progress=True, **options)
    result = info.to_dict()
    if args.json:
        print_json(result)
        return 0
    held = f" + {info.n_heldout} held out" if info.n_heldout else ""
    if args.kind == "shapes":
        log(f"wrote {info.n_images} images{held} ({info.n_single_object} with one object) to {info.out_dir}")
        print(f"captions:     {info.captions}")
        print(f"shapes:       {info.shapes}")
        print(f"colors:       {info.colors}")
        print(f"segmentation: {info.segmentation} (by shape), {info.segmentation_colors} (by colour)")
    else:
        log(f"wrote {info.n_images} {args.kind} images{held} to {info.out_dir}")
        print(f"captions:     {info.captions}")
        print(f"labels:       {info.labels} (classes: {', '.join(info.label_classes)}; templates: {info.templates})")
    if info.n_heldout:
        print(f"held out:     {info.captions_heldout}, {info.labels_heldout}")
    return 0
