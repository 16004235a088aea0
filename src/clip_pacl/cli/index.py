"""`clip-pacl index build`: embed a folder (or a file's image column) into a searchable image index."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl.checkpoint import load_with_source
from clip_pacl.cli.common import (
    add_device_flag,
    add_int8_flag,
    add_json_flag,
    load_device,
    log,
    print_json,
    quantization,
)
from clip_pacl.retrieval.index import build_index, image_paths

COMMAND = "index build"
GROUP_HELP = "image index commands"
HELP = "embed images into an index for `clip-pacl search` and `clip-pacl serve`"
DESCRIPTION = (
    "Embed every image under a folder (recursively), or every image of a CSV/TSV/JSONL file's image "
    "column, and write IDX/embeddings.npy (float32, normalised), IDX/paths.jsonl and IDX/meta.json "
    "(with a fingerprint of the weights and preprocessing, which queries must match). Unreadable images are "
    "skipped and counted. The index is written beside IDX and renamed into place: an existing index is "
    "replaced whole or not at all."
)
ORDER = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint dir or model file (its path is recorded in meta.json)")
    parser.add_argument("--images", required=True, type=Path, metavar="DIR|FILE",
                        help="a folder of images (searched recursively) or a CSV/TSV/JSONL file with an image column")
    parser.add_argument("--out", required=True, type=Path, metavar="IDX", help="index directory to write")
    parser.add_argument("--image-key", default="image", help="image column when --images is a file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    add_device_flag(parser)
    add_int8_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    paths = image_paths(args.images, args.image_key)
    model, source = load_with_source(args.model, device=load_device(args))
    images = {"source": str(args.images.resolve()), "image_key": args.image_key}
    index, unreadable = build_index(model, paths, args.batch_size, args.workers, model_source=args.model,
                                    images=images, hub_revision=source.revision, quantize=quantization(args))
    index.save(args.out)
    if not index.meta["model_has_weights"]:
        log(f"warning: '{args.model}' is randomly initialised; searching {args.out} will need --model")
    summary = {"index": str(args.out), **index.meta,
               "unreadable": [{"path": p, "reason": r} for p, r in unreadable]}
    if args.json:
        print_json(summary)
        return 0
    print(f"indexed {len(index)} images ({index.embed_dim}-d) into {args.out}")
    if unreadable:
        print(f"{len(unreadable)} unreadable images skipped (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    return 0
