"""`clip-pacl segment`: label every pixel of an image with one of the given class names."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl.segmentation.rules import RULE_HELP, RULES
from clip_pacl_app.cli.common import (
    MODEL_HELP,
    add_device_flag,
    add_json_flag,
    add_model_flags,
    add_precision_flag,
    load_model,
    log,
    print_json,
    resolve_device,
)
from clip_pacl_app.cli.defaults import DEFAULT_TEMPLATES, METHODS, NO_CLASS

COMMAND = "segment"
HELP = "segment an image by class names (PACL, or the raw-patch / MaskCLIP baselines of a CLIP)"
DESCRIPTION = (
    "Score every patch of the image against each class's prompts, upsample the scores to the image size and "
    "label each pixel with its best class. Writes the label mask (pixel = index of the class in --classes, "
    f"{NO_CLASS} = unassigned) and optionally a colour overlay with a legend."
)
ORDER = 35


def add_segmentation_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `segment` and `eval segmentation`."""
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="pacl: PACL's embedders; patch: raw CLIP patch tokens; maskclip: MaskCLIP's value-path "
                             "tokens (default: pacl for PACL checkpoints, patch otherwise)")
    parser.add_argument("--background", default="auto", metavar="|".join((*RULES, "F")),
                        help="how pixels become background (the class named 'background' if listed, else "
                             "unassigned): " + "; ".join(f"{name} = {RULE_HELP[name]}" for name in RULES)
                             + "; F = a fixed cosine")
    parser.add_argument("--background-threshold", type=float, default=None, metavar="F",
                        help="pixels whose best class score (cosine) is below F become background (the same as "
                             "--background F)")
    parser.add_argument("--sliding-window", action="store_true",
                        help="slide overlapping crops of the model's input size over the image at its own "
                             "resolution and average their scores (for images larger than the model's input)")
    parser.add_argument("--template", action="append", default=[], metavar="T",
                        help="a prompt template with {} for the class name (repeatable; default: "
                             + " | ".join(DEFAULT_TEMPLATES) + ")")
    parser.add_argument("--templates", default=None, metavar="openai|simple|FILE",
                        help="a template set instead of the default: openai (80), simple or a file, one per line")


def background_choice(args: argparse.Namespace) -> str | float:
    """--background, or --background-threshold when given (it wins)."""
    return args.background if args.background_threshold is None else args.background_threshold


def resolve_segmentation_templates(args: argparse.Namespace) -> list[str]:
    from clip_pacl.zeroshot.templates import resolve_templates

    if args.templates is None and not args.template:
        return list(DEFAULT_TEMPLATES)
    return resolve_templates(args.templates, args.template)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the image to segment")
    add_model_flags(parser, "a PACL or CLIP: " + MODEL_HELP)
    parser.add_argument("--classes", required=True, metavar="a,b,c|FILE",
                        help="class names: comma-separated or a file with one per line")
    parser.add_argument("--out", required=True, type=Path, help="where to write the label mask PNG")
    parser.add_argument("--overlay", type=Path, default=None, help="also write a colour overlay with a legend here")
    add_segmentation_flags(parser)
    add_device_flag(parser)
    add_precision_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data import load_image
    from clip_pacl.segmentation.background import resolve_background
    from clip_pacl.segmentation.overlay import mask_image, overlay_image
    from clip_pacl.segmentation.predict import default_method, segment
    from clip_pacl.zeroshot.templates import resolve_class_names

    class_names = resolve_class_names(args.classes)
    if len(class_names) > 255:
        raise ValueError(f"at most 255 classes fit in the mask PNG (got {len(class_names)})")
    templates = resolve_segmentation_templates(args)
    image = load_image(args.image)  # fail on a bad path before loading the model
    for path in (args.out, args.overlay):
        if path is not None and not path.parent.is_dir():
            raise FileNotFoundError(f"output folder {path.parent} does not exist")
    model = load_model(args, device=resolve_device(args.device)).eval()
    method = args.method or default_method(model)
    rule = resolve_background(model, class_names, background_choice(args), method)
    result = segment(model, image, class_names, templates=templates, background=rule,
                     sliding_window=args.sliding_window, method=method, keep_scores=False)
    log(f"background: {rule.describe()}")
    mask_image(result.label_map).save(args.out)
    fractions = result.fractions()
    if args.overlay is not None:
        overlay_image(image, result.label_map, class_names, fractions).save(args.overlay)
    unassigned = float((result.label_map == NO_CLASS).mean())
    summary = {"image": str(args.image), "model": args.model, "method": method, "background": rule.to_dict(),
               "mask": str(args.out), "overlay": str(args.overlay) if args.overlay else None,
               "size": [image.width, image.height], "fractions": fractions, "unassigned": unassigned}
    if args.json:
        print_json(summary)
        return 0
    print(f"{args.image}  ->  {args.out}" + (f"  (overlay {args.overlay})" if args.overlay else ""))
    width = max(len(n) for n in class_names)
    for name, share in sorted(fractions.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<{width}}  {100 * share:6.2f} %")
    if unassigned:
        print(f"  {'(unassigned)':<{width}}  {100 * unassigned:6.2f} %")
    return 0

