"""`clip-pacl eval segmentation`: open-vocabulary mIoU on a segmentation dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl_app.cli.common import (
    MODEL_HELP,
    add_device_flag,
    add_json_flag,
    add_model_flags,
    add_precision_flag,
    load_model,
    log,
    print_json,
    print_per_class,
    resolve_device,
)
from clip_pacl_app.cli.segment import add_segmentation_flags, background_choice, resolve_segmentation_templates

COMMAND = "eval segmentation"
GROUP_HELP = "measure a model: zero-shot accuracy, retrieval recall, segmentation mIoU"
HELP = "segmentation mIoU, per-class IoU and pixel accuracy, with class names as the only supervision"
DESCRIPTION = (
    "Segment every image of DIR by its class names and report mIoU (intersection and union summed over the "
    "whole dataset; 255 pixels ignored; classes absent from both ground truth and predictions excluded), "
    "per-class IoU and pixel accuracy. DIR is our format (images/, masks/, classes.txt) or a Pascal VOC, "
    "Pascal Context 59, COCO-Stuff 164k or ADE20K tree as mmseg prepares it. Without --template/--templates, "
    "the prompt templates come from DIR/templates.txt when it exists (the synthetic sets ship one), else "
    "the default four."
)
ORDER = 42
PER_CLASS_TABLE_MAX = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, "a PACL or CLIP: " + MODEL_HELP)
    parser.add_argument("--data", required=True, type=Path, help="segmentation dataset directory")
    add_segmentation_flags(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    add_device_flag(parser)
    add_precision_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.segmentation.evaluate import evaluate_segmentation

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    templates = None if args.templates is None and not args.template else resolve_segmentation_templates(args)
    model = load_model(args, device=resolve_device(args.device)).eval()
    result = evaluate_segmentation(model, args.data, method=args.method, background=background_choice(args),
                                   templates=templates,
                                   batch_size=args.batch_size, sliding_window=args.sliding_window, limit=args.limit,
                                   progress=True)
    result = {"model": args.model, **result}
    log(f"background: {result['background']['description']}")
    if result["skipped_images"]:
        log(f"warning: {result['skipped_images']} unreadable images were skipped")
    if args.json:
        print_json(result)
        return 0
    print(f"segmentation  {args.data}  ({result['dataset']}, {result['num_images']} images, method {result['method']})")
    print(f"  mIoU            {100 * result['miou']:6.2f} %")
    print(f"  pixel accuracy  {100 * result['pixel_accuracy']:6.2f} %")
    print_per_class("per-class IoU", result["per_class_iou"], PER_CLASS_TABLE_MAX)
    return 0
