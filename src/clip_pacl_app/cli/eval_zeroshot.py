"""`clip-pacl eval zeroshot`: zero-shot classification accuracy on a labelled image file."""

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
    print_per_class,
    quantization,
)

COMMAND = "eval zeroshot"
GROUP_HELP = "measure a model: zero-shot accuracy, retrieval recall, segmentation mIoU"
HELP = "zero-shot classification accuracy (top-1, top-5, mean per-class recall)"
DESCRIPTION = (
    "Classify each image of a CSV/TSV/JSONL file (columns image,label) or of a folder of class folders "
    "among the class names by prompts alone and report top-1, top-5 and mean per-class recall. The "
    "classes are the distinct labels, or --classes. Unreadable images are skipped and counted."
)
ORDER = 40
PER_CLASS_TABLE_MAX = 30


def add_template_flags(parser: argparse.ArgumentParser) -> None:
    """The prompt flags shared by `eval zeroshot` and `zeroshot`."""
    parser.add_argument("--template", action="append", default=[], metavar="T",
                        help="a prompt template with {} for the class name (repeatable); adds to --templates")
    parser.add_argument("--templates", default=None, metavar="openai|simple|FILE",
                        help="a template set: openai (80), simple (7) or a file with one template per line; "
                             "with neither this nor --template, openai")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--data", required=True, type=Path,
                        help="CSV/TSV/JSONL file with image and label columns, or a folder of class folders "
                             "(DIR/<class>/<image>, as torchvision's ImageFolder)")
    add_template_flags(parser)
    parser.add_argument("--image-key", default="image", help="column holding the image path")
    parser.add_argument("--label-key", default="label", help="column holding the class label")
    parser.add_argument("--classes", default=None, metavar="a,b,c|FILE|imagenet",
                        help="class names, in order; rows with other labels are left out; integer labels "
                             "index into this list (default: the distinct labels, sorted)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write confusion_matrix.png (matplotlib) into this folder")
    add_device_flag(parser)
    add_precision_flag(parser)
    add_int8_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data.imagefolder import read_labelled
    from clip_pacl.zeroshot.evaluate import evaluate_zeroshot
    from clip_pacl.zeroshot.templates import resolve_class_names, resolve_templates

    templates = resolve_templates(args.templates, args.template)
    class_names = resolve_class_names(args.classes) if args.classes is not None else None
    rows = read_labelled(args.data, class_names, image_key=args.image_key, label_key=args.label_key)
    model = load_model(args, device=load_device(args), quantize=quantization(args))
    result = evaluate_zeroshot(model, rows, templates, batch_size=args.batch_size, workers=args.workers,
                               class_names=class_names, plots=args.plots)
    result = {"model": args.model, "data": str(args.data), **result}
    if args.json:
        print_json(result)
        return 0
    print(f"zero-shot  {args.data}  ({result['num_images']} images, {result['num_classes']} classes, "
          f"{result['num_templates']} templates)")
    print_classification(result, "rows had labels outside --classes and were left out")
    for png in result.get("plots", []):
        print(f"  plot: {png}")
    return 0


def print_classification(result: dict, skipped: str) -> None:
    """The accuracy lines shared by `eval zeroshot` and `eval linear-probe`; `skipped` says why rows were left out."""
    print(f"  top-1                  {100 * result['top1']:6.2f} %")
    print(f"  top-{result['top5_k']}                  {100 * result['top5']:6.2f} %")
    print(f"  mean per-class recall  {100 * result['mean_per_class_recall']:6.2f} %")
    print_per_class("per-class recall", result["per_class_recall"], PER_CLASS_TABLE_MAX)
    if result["skipped_rows"]:
        print(f"  {result['skipped_rows']} {skipped}")
    if result["num_unreadable"]:
        first = result["unreadable"][0]
        print(f"  {result['num_unreadable']} unreadable images skipped (e.g. {first['path']}: {first['reason']})")
