"""`clip-pacl eval linear-probe`: logistic regression on frozen image features, C chosen on a validation split."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl_app.cli.common import (
    add_device_flag,
    add_json_flag,
    add_model_flags,
    add_precision_flag,
    load_model,
    log,
    print_json,
    resolve_device,
)
from clip_pacl_app.cli.defaults import DEFAULT_CS
from clip_pacl_app.cli.eval_zeroshot import print_classification

COMMAND = "eval linear-probe"
HELP = "linear-probe accuracy: logistic regression on frozen image features"
DESCRIPTION = (
    "Encode the training and test images with the model, fit a logistic regression on the training features "
    "with its regularisation C chosen on a held-out part of them (a log-spaced sweep, as in the CLIP paper), "
    "refit on all of them and report top-1, top-5 and per-class recall on the test images."
)
ORDER = 42


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    for flag in ("--train", "--test"):
        parser.add_argument(flag, required=True, type=Path,
                            help="CSV/TSV/JSONL file with image and label columns, or a folder of class folders")
    parser.add_argument("--image-key", default="image", help="column holding the image path")
    parser.add_argument("--label-key", default="label", help="column holding the class label")
    parser.add_argument("--c", type=float, nargs="+", default=list(DEFAULT_CS), metavar="C",
                        help="regularisation values to sweep (default: 1e-6 ... 1e6, 13 log-spaced)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the training images held out to choose C")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    add_device_flag(parser)
    add_precision_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data.imagefolder import read_labelled
    from clip_pacl.eval.linear_probe import evaluate_linear_probe

    keys = dict(image_key=args.image_key, label_key=args.label_key)
    train_rows, test_rows = read_labelled(args.train, **keys), read_labelled(args.test, **keys)
    model = load_model(args, device=resolve_device(args.device))
    result = evaluate_linear_probe(model, train_rows, test_rows, cs=args.c, val_fraction=args.val_fraction,
                                   seed=args.seed, batch_size=args.batch_size, workers=args.workers)
    result = {"model": args.model, "train": str(args.train), "test": str(args.test), **result}
    overlap = ""
    if result["overlap"]:
        n_test = len({Path(r.image).resolve() for r in test_rows})
        overlap = (f"WARNING: {result['overlap']} of the {n_test} test images are also training images: the accuracy "
                   f"measures memorisation, not what the features generalise to; test on images the probe never saw")
        log(f"\n{overlap}")
    if args.json:
        print_json(result)
        return 0
    print(f"linear probe  {args.test}  ({result['num_images']} test images, {result['num_classes']} classes, "
          f"{result['num_train_images']} training images, C = {result['C']:g})")
    print_classification(result, "test rows had labels no training image has and were left out")
    if overlap:
        print(overlap)
    return 0
