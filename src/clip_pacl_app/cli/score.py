"""`clip-pacl score`: CLIPScore (and RefCLIPScore with references) of every (image, caption) pair of a file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clip_pacl.errors import DataError
from clip_pacl_app.cli.common import (
    add_device_flag,
    add_json_flag,
    add_model_flags,
    add_precision_flag,
    load_model,
    print_json,
    resolve_device,
)
from clip_pacl_app.cli.defaults import DATA_FORMATS, W

COMMAND = "score"
HELP = "CLIPScore of image-caption pairs (RefCLIPScore with --references)"
DESCRIPTION = (
    "Score how well each caption fits its image: CLIPScore = w * max(cos, 0) with w = 2.5 (Hessel et al. 2021), "
    "and, with reference captions, RefCLIPScore (harmonic mean of CLIPScore and the best caption-reference "
    "cosine). Prints the mean and, for small files, every pair. Unreadable images are skipped and counted."
)
ORDER = 45
PAIR_TABLE_MAX = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--data", required=True, type=Path,
                        help="the pairs to score: a CSV/TSV/JSONL table (image,caption) or any caption format "
                             "`eval retrieval` reads")
    parser.add_argument("--references", type=Path, default=None, metavar="FILE",
                        help="reference captions in the same formats, matched to --data by image path")
    parser.add_argument("--data-format", default=None, choices=[f for f in DATA_FORMATS if f != "wds"],
                        help="reader to use when the file name does not tell (default: guessed)")
    parser.add_argument("--image-key", default="image", help="column holding the image path")
    parser.add_argument("--caption-key", default="caption", help="column holding the caption")
    parser.add_argument("--prefix", default="",
                        help='text put before every caption and reference; the paper used "A photo depicts"')
    parser.add_argument("--w", type=float, default=W, help="rescaling weight of CLIPScore")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    add_device_flag(parser)
    add_precision_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data import read_caption_rows
    from clip_pacl.metrics import clip_score

    keys = dict(data_format=args.data_format, image_key=args.image_key, caption_key=args.caption_key)
    rows = read_caption_rows(args.data, **keys)
    references = None
    if args.references is not None:
        by_image: dict[str, list[str]] = {}
        for ref in read_caption_rows(args.references, **keys):
            by_image.setdefault(os.path.abspath(ref.image), []).append(ref.caption)
        missing = [row.image for row in rows if os.path.abspath(row.image) not in by_image]
        if missing:
            raise DataError(f"{args.references} has no reference for {len(missing)} image(s) of {args.data} "
                            f"(e.g. {missing[0]})")
        references = [by_image[os.path.abspath(row.image)] for row in rows]
    model = load_model(args, device=resolve_device(args.device))
    scores = clip_score(model, [row.image for row in rows], [row.caption for row in rows], references, w=args.w,
                        prefix=args.prefix, batch_size=args.batch_size, workers=args.workers, progress=True)
    pairs = []
    for i, pair in enumerate(scores.pairs.tolist()):
        entry = {"image": str(rows[pair].image), "caption": rows[pair].caption,
                 "clip_score": float(scores.clip_score[i])}
        if scores.ref_clip_score is not None:
            entry["ref_clip_score"] = float(scores.ref_clip_score[i])
        pairs.append(entry)
    result = {"model": args.model, "data": str(args.data), "w": args.w, "prefix": args.prefix,
              **scores.summary(), "pairs": pairs}
    if args.json:
        print_json(result)
        return 0
    print(f"CLIPScore  {args.data}  ({result['num_pairs']} pairs, w = {args.w:g})")
    print(f"  CLIPScore     {result['clip_score']:.4f}")
    if "ref_clip_score" in result:
        print(f"  RefCLIPScore  {result['ref_clip_score']:.4f}")
    if len(pairs) <= PAIR_TABLE_MAX:
        for entry in pairs:
            ref = f"  ref {entry['ref_clip_score']:.4f}" if "ref_clip_score" in entry else ""
            print(f"    {entry['clip_score']:.4f}{ref}  {Path(entry['image']).name}  {entry['caption']}")
    else:
        print(f"  (the {len(pairs)} pairs' scores: use --json)")
    if result["num_unreadable"]:
        first = result["unreadable"][0]
        print(f"  {result['num_unreadable']} unreadable images skipped (e.g. {first['path']}: {first['reason']})")
    return 0
