"""`clip-pacl zeroshot`: classify images among class names given on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl.errors import DataError
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
from clip_pacl_app.cli.eval_zeroshot import add_template_flags

COMMAND = "zeroshot"
HELP = "classify images among class names, by prompts alone"
DESCRIPTION = (
    "Print each image's most probable classes: the softmax over classes of logit_scale times the "
    "similarity of the image to each class's prompt-ensembled text embedding (for SigLIP models, the "
    "sigmoid of each class's logit plus the learned bias)."
)
ORDER = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                        help="image files to classify; a folder stands for every image under it")
    add_model_flags(parser)
    parser.add_argument("--classes", required=True, metavar="a,b,c|FILE|imagenet",
                        help="class names: comma-separated, a file with one per line, or imagenet")
    add_template_flags(parser)
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (capped at the class count)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    add_device_flag(parser)
    add_precision_flag(parser)
    add_int8_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from clip_pacl.data import load_image
    from clip_pacl.data.folders import image_files
    from clip_pacl.encode import model_device
    from clip_pacl.preprocess import model_transform
    from clip_pacl.zeroshot.classifier import build_classifier, class_probabilities
    from clip_pacl.zeroshot.templates import resolve_class_names, resolve_templates

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    class_names = resolve_class_names(args.classes)
    templates = resolve_templates(args.templates, args.template)
    args.images = [p for arg in args.images for p in (image_files(arg) if arg.is_dir() else [arg])]
    if not args.images:
        raise DataError("the folders given hold no images")
    images = [load_image(path) for path in args.images]  # fail on a bad path before loading the model
    model = load_model(args, device=load_device(args), quantize=quantization(args)).eval()
    classifier = build_classifier(model, class_names, templates)  # (C, D)
    transform = model_transform(model)
    k = min(args.top_k, len(class_names))
    results = []
    for start in range(0, len(images), args.batch_size):
        pixels = torch.stack([transform(im) for im in images[start:start + args.batch_size]])  # (B, 3, H, W)
        probs = class_probabilities(model, pixels.to(model_device(model)), classifier).cpu()  # (B, C)
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(args.images[start:], top.values.tolist(), top.indices.tolist()):
            results.append({"image": str(path),
                            "predictions": [{"label": class_names[i], "probability": p}
                                            for p, i in zip(values, indices)]})
    if args.json:
        print_json({"model": args.model, "classes": class_names, "num_templates": len(templates),
                    "results": results})
        return 0
    width = max(len(name) for name in class_names)
    for result in results:
        print(result["image"])
        for pred in result["predictions"]:
            print(f"  {pred['label']:<{width}}  {100 * pred['probability']:6.2f} %")
    return 0
