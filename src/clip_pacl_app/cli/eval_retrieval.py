"""`clip-pacl eval retrieval`: image-text retrieval recall@1/5/10 on a captions file."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl_app.cli.common import (
    add_device_flag,
    add_int8_flag,
    add_json_flag,
    add_model_flags,
    add_precision_flag,
    load_device,
    load_model,
    print_json,
    quantization,
)
from clip_pacl_app.cli.defaults import DATA_FORMATS

COMMAND = "eval retrieval"
HELP = "image-to-text and text-to-image recall@1/5/10"
DESCRIPTION = (
    "Rank every caption for every image and every image for every caption of a caption dataset "
    "(several captions may share an image) and report recall@1/5/10 both ways and their mean. "
    "Unreadable images are left out with their captions, and counted."
)
ORDER = 41


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--data", required=True, type=Path,
                        help="captions: a CSV/TSV/JSONL table (image,caption), a COCO captions JSON, a Flickr "
                             "captions file or an image folder with .txt captions")
    parser.add_argument("--data-format", default=None, choices=[f for f in DATA_FORMATS if f != "wds"],
                        help="reader to use when the file name does not tell (default: guessed)")
    parser.add_argument("--image-key", default="image", help="column holding the image path")
    parser.add_argument("--caption-key", default="caption", help="column holding the caption")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write retrieval_grid.png, captions with their top-5 images, into this folder")
    add_device_flag(parser)
    add_precision_flag(parser)
    add_int8_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data import read_caption_rows
    from clip_pacl.retrieval.evaluate import evaluate_retrieval

    rows = read_caption_rows(args.data, data_format=args.data_format, image_key=args.image_key,
                             caption_key=args.caption_key)
    model = load_model(args, device=load_device(args), quantize=quantization(args))
    result = evaluate_retrieval(model, rows, batch_size=args.batch_size, workers=args.workers, plots=args.plots)
    result = {"model": args.model, "data": str(args.data), **result}
    if args.json:
        print_json(result)
        return 0
    print(f"retrieval  {args.data}  ({result['num_images']} images, {result['num_captions']} captions)")
    print("                 R@1      R@5     R@10")
    for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        cells = "  ".join(f"{100 * result[f'{direction}_R@{k}']:6.2f}" for k in (1, 5, 10))
        print(f"  {label:<12} {cells}")
    print(f"  mean recall  {100 * result['mean_recall']:6.2f}")
    if result["num_unreadable"]:
        first = result["unreadable"][0]
        print(f"  {result['num_unreadable']} unreadable images skipped (e.g. {first['path']}: {first['reason']})")
    for png in result.get("plots", []):
        print(f"  plot: {png}")
    return 0
