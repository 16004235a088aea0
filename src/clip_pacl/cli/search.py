"""`clip-pacl search`: the images of an index that best match a text query or an example image."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl.cli.common import add_device_flag, add_int8_flag, add_json_flag, load_device, print_json, quantization
from clip_pacl.data import load_image
from clip_pacl.retrieval.index import ImageIndex
from clip_pacl.retrieval.search import load_index_model, search_image, search_text

COMMAND = "search"
HELP = "search an image index by text or by example image"
DESCRIPTION = (
    "Rank the images of an index (made by `clip-pacl index build`) by cosine similarity to a text query "
    "or to an example image, with the model recorded in the index (or --model)."
)
ORDER = 51


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=Path, metavar="IDX", help="index directory")
    parser.add_argument("query", nargs="?", default=None, help="text query (or use --image)")
    parser.add_argument("--image", type=Path, default=None, metavar="FILE", help="search by this example image")
    parser.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="number of results")
    parser.add_argument("--model", default=None,
                        help="model to embed the query; none: the one recorded in the index's meta.json")
    parser.add_argument("--faiss", action="store_true",
                        help="search with faiss (exact inner product; needs clip-pacl[faiss]); by default faiss "
                             "is used only for large indexes and when installed")
    parser.add_argument("--force", action="store_true",
                        help="search even when --model's weights or preprocessing differ from those that built "
                             "the index (the scores then compare unlike embeddings)")
    add_device_flag(parser)
    add_int8_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image FILE (exactly one)")
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    index = ImageIndex.load(args.index)
    image = load_image(args.image) if args.image is not None else None  # a bad path fails before the model loads
    model = load_index_model(index, args.model, device=load_device(args), force=args.force,
                             quantize=quantization(args))
    backend = "faiss" if args.faiss else "auto"
    if image is None:
        hits = search_text(index, model, args.query, args.k, backend)[0]
    else:
        hits = search_image(index, model, image, args.k, backend)
    if args.json:
        print_json({"index": str(args.index), "query": args.query,
                    "image": str(args.image) if args.image else None,
                    "results": [{"path": h.path, "score": h.score} for h in hits]})
        return 0
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:3d}  {hit.score:7.4f}  {hit.path}")
    return 0
