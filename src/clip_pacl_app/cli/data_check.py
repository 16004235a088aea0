"""`clip-pacl data check`: read a caption dataset and decode every image, listing what is broken."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.common import add_json_flag, print_json

COMMAND = "data check"
GROUP_HELP = "dataset tools"
HELP = "check a caption dataset: format, columns, and that every image decodes"
DESCRIPTION = (
    "Read DATA the way `clip-pacl train --data` does and decode every distinct image once. Prints the "
    "row and image counts and the first problems found. Exits 0 when no image is bad (or no more than "
    "--max-bad-fraction), 1 when more are, 2 when the data cannot be read at all."
)
ORDER = 91


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="caption file, folder or webdataset shard pattern")
    parser.add_argument("--data-format", default=None, help="csv, tsv, jsonl, json, coco, flickr, folder or wds "
                        "(default: from the path)")
    parser.add_argument("--image-key", default="image", help="image column of a CSV/TSV/JSONL file")
    parser.add_argument("--caption-key", default="caption", help="caption column of a CSV/TSV/JSONL file")
    parser.add_argument("--images", default=None, metavar="DIR", help="image folder (COCO, Flickr), or the root "
                        "that relative paths of a table are resolved against")
    parser.add_argument("--limit", type=int, default=None, help="check only this many images, drawn at random")
    parser.add_argument("--threads", type=int, default=4, help="decoding threads")
    parser.add_argument("--max-bad-fraction", type=float, default=0.0,
                        help="exit 1 when more than this fraction of the checked images is unreadable")
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data.check import check_caption_data

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {args.limit})")
    report = check_caption_data(args.data, data_format=args.data_format, image_key=args.image_key,
                                caption_key=args.caption_key, images_dir=args.images, limit=args.limit,
                                threads=args.threads, progress=True)
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"{report.source} ({report.format}): {report.rows} rows, {report.images} images checked, "
              f"{report.bad_images} unreadable ({report.bad_fraction:.2%}); "
              f"{report.captions_per_image} captions per image, {report.mean_caption_words} words per caption")
        for problem in report.problems:
            print(f"  {problem}")
    return 1 if report.bad_fraction > args.max_bad_fraction else 0
