"""`clip-pacl search`: the images of an index that best match a text query or an example image."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from clip_pacl_app.cli.ann_flags import add_ann_flags, query_settings
from clip_pacl_app.cli.common import (
    add_device_flag,
    add_int8_flag,
    add_json_flag,
    add_precision_flag,
    add_weights_flags,
    cli_load_errors,
    fold_pretrained,
    load_device,
    print_json,
    quantization,
    say_precision,
)

COMMAND = "search"
HELP = "search an image index by text or by example image"
DESCRIPTION = (
    "Rank the images of an index (made by `clip-pacl index build`) by cosine similarity to a text query "
    "or to an example image, with the model recorded in the index (or --model). With --prefix, only the images "
    "whose path starts with it are ranked, exactly (k of them come back when k match). An index built from a "
    "table shows each image's other columns (caption, ...) under its line, and in --json as `metadata`. An index "
    "built with --faiss-index is searched approximately with its faiss index (--nprobe, --ef-search, --rerank "
    "tune it; --exact does not use it); a --prefix search never uses it."
)
ORDER = 51


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=Path, metavar="IDX", help="index directory")
    parser.add_argument("query", nargs="?", default=None, help="text query (or use --image)")
    parser.add_argument("--image", type=Path, default=None, metavar="FILE", help="search by this example image")
    parser.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="number of results")
    add_weights_flags(parser)
    parser.add_argument("--model", default=None,
                        help="model to embed the query; none: the one recorded in the index's meta.json")
    parser.add_argument("--prefix", default=None, metavar="PATH",
                        help="rank only images whose indexed path starts with PATH (a relative PATH is taken from "
                             "the current folder; end it with / for a folder, or it also matches e.g. DIR/sub2); "
                             "exact search over the matching images (not with --nprobe, --ef-search, --rerank)")
    parser.add_argument("--faiss", action="store_true",
                        help="search exactly with faiss (inner product; needs clip-pacl[faiss]), not with the "
                             "index's approximate faiss index; by default exact search uses faiss only for large "
                             "indexes and when installed")
    parser.add_argument("--exact", action="store_true",
                        help="search exactly even when the index has an approximate faiss index")
    add_ann_flags(parser)
    parser.add_argument("--force", action="store_true",
                        help="search even when --model's weights or preprocessing differ from those that built "
                             "the index (the scores then compare unlike embeddings)")
    add_device_flag(parser)
    add_precision_flag(parser)
    add_int8_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.data import load_image
    from clip_pacl.retrieval.filters import check_prefix, prefix_rows
    from clip_pacl.retrieval.search import load_index_model, search_image, search_text
    from clip_pacl.retrieval.store import ImageIndex

    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image FILE (exactly one)")
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    prefix = absolute_prefix(check_prefix(args.prefix)) if args.prefix is not None else None
    settings = query_settings(args)
    if prefix is not None and any(v is not None for v in settings.values()):
        raise ValueError("--nprobe, --ef-search and --rerank tune approximate search; a --prefix search is exact "
                         "over the matching images (leave them out)")
    index = ImageIndex.load(args.index)
    backend = "faiss" if args.faiss else "torch" if args.exact else "auto"
    index.uses_ann(backend, **settings)  # settings that cannot apply fail before the model loads
    image = load_image(args.image) if args.image is not None else None  # a bad path fails before the model loads
    fold_pretrained(args)  # --pretrained folded into --model: an index records weights that load again
    with cli_load_errors():
        model = load_index_model(index, args.model, device=load_device(args), force=args.force,
                                 random_weights=args.random_weights, quantize=quantization(args),
                                 precision=args.precision)
    say_precision(args, model.precision)
    if image is None:
        hits = search_text(index, model, args.query, args.k, backend, prefix=prefix, **settings)[0]
    else:
        hits = search_image(index, model, image, args.k, backend, prefix=prefix, **settings)
    if args.json:
        print_json({"index": str(args.index), "query": args.query,
                    "image": str(args.image) if args.image else None, "prefix": prefix,
                    "matched": len(index) if prefix is None else len(prefix_rows(index, prefix)),
                    "results": [_result(h) for h in hits]})
        return 0
    if not hits and prefix is not None:
        print(f"no results: none of the {len(index)} indexed images has a path starting with {prefix} "
              f"(they look like {index.paths[0]})")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:3d}  {hit.score:7.4f}  {hit.path}")
        if hit.metadata:
            print(" " * 14 + "  ".join(f"{key}: {_cell(value)}" for key, value in hit.metadata.items()))
    return 0


def absolute_prefix(prefix: str) -> str:
    """A relative file-path prefix made absolute from the current folder, keeping a trailing separator (indexed
    paths are absolute); a URL prefix (webdataset shards on a server) unchanged."""
    if "://" in prefix or prefix.startswith("pipe:"):
        return prefix
    path = os.path.abspath(prefix)
    return path + os.sep if prefix.endswith(("/", os.sep)) and not path.endswith(os.sep) else path


def _result(hit) -> dict[str, Any]:
    return {"path": hit.path, "score": hit.score, **({"metadata": hit.metadata} if hit.metadata is not None else {})}


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "")
