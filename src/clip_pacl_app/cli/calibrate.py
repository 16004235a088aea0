"""`clip-pacl calibrate`: give a PACL checkpoint its background threshold, from caption data (no masks)."""

from __future__ import annotations

import argparse
from pathlib import Path

import clip_pacl
from clip_pacl.errors import ConfigError
from clip_pacl_app.cli.common import add_device_flag, add_json_flag, log, print_json, resolve_device
from clip_pacl_app.cli.defaults import CALIBRATION_IMAGES

COMMAND = "calibrate"
HELP = "calibrate a PACL checkpoint's background threshold on its training captions (no masks needed)"
DESCRIPTION = (
    "Score each image's patches against its own caption with the PACL model, split the pooled scores in two "
    "(Otsu: the described objects vs the rest) and store that cosine in MODEL/config.json as the background "
    "threshold that `segment` and `eval segmentation` use with --background calibrated (the default, auto, is a "
    "per-image rule). PACL training does not calibrate; run this on its output. MODEL may be the training run "
    "directory (its final/ model is rewritten)."
)
ORDER = 36


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="PACL checkpoint directory or training run directory (rewritten in place)")
    parser.add_argument("--data", required=True,
                        help="image-caption data (CSV/TSV/JSONL/COCO/Flickr/folder), ideally what PACL trained on")
    parser.add_argument("--limit", type=int, default=CALIBRATION_IMAGES, metavar="N",
                        help="score at most N distinct images")
    parser.add_argument("--data-format", default=None, metavar="F", help="the data's format, when not detected")
    parser.add_argument("--image-key", default="image", metavar="K", help="image column")
    parser.add_argument("--caption-key", default="caption", metavar="K", help="caption column")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_device_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.checkpoint.rundir import resolve_run_dir
    from clip_pacl.segmentation.calibrate import calibrate_background, write_calibration

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if not args.model.is_dir():
        raise FileNotFoundError(f"{args.model} is not a directory (calibrate rewrites a PACL checkpoint dir)")
    args.model = Path(resolve_run_dir(args.model))  # a training run means its final/ (or newest checkpoint)
    model = clip_pacl.load(str(args.model), device=resolve_device(args.device)).eval()
    if not hasattr(model, "patch_embeddings"):
        raise ConfigError(f"{args.model} is a plain CLIP; only PACL checkpoints are calibrated (the raw-patch and "
                          "MaskCLIP methods use a per-image rule: --background auto, zscore or otsu)")
    before = model.config.background_threshold
    result = calibrate_background(model, args.data, limit=args.limit, batch_size=args.batch_size,
                                  data_format=args.data_format, image_key=args.image_key,
                                  caption_key=args.caption_key, progress=True)
    write_calibration(model, args.model, result["background_threshold"])
    result = {"model": str(args.model), "previous_threshold": before, **result}
    log(f"saved background threshold {result['background_threshold']:.4f} in {args.model}/config.json")
    if args.json:
        print_json(result)
        return 0
    print(f"background threshold {result['background_threshold']:.4f}  ({result['images']} images, "
          f"{100 * result['object_fraction']:.1f} % of patches above it)"
          + (f"; was {before:.4f}" if before is not None else ""))
    return 0
