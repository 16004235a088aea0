"""`clip-pacl index update`: bring an index up to date with its folder or table, embedding only what changed."""

from __future__ import annotations

import argparse
from pathlib import Path

from clip_pacl.errors import DataError
from clip_pacl_app.cli.common import (
    add_device_flag,
    add_json_flag,
    add_weights_flags,
    cli_load_errors,
    fold_pretrained,
    print_json,
    resolve_device,
)

COMMAND = "index update"
HELP = "re-embed new and changed images of an index, drop deleted ones"
DESCRIPTION = (
    "List the images of the folder or table the index was built from again; embed the new ones and those "
    "whose size or modification time changed, keep the others' embeddings, drop the deleted ones. The result "
    "equals a fresh `index build` and replaces IDX atomically. An index of webdataset shards is embedded again "
    "whole (its shards are listed again from the recorded pattern). An approximate faiss index (--faiss-index) is "
    "built again, from the same factory string and settings, for the updated embeddings ('auto' chooses again)."
)
ORDER = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=Path, metavar="IDX", help="index directory made by `clip-pacl index build`")
    add_weights_flags(parser)
    parser.add_argument("--model", default=None,
                        help="the model that built the index (default: the one recorded in its meta.json)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    add_device_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.retrieval.ann import import_faiss, rebuild_request
    from clip_pacl.retrieval.build import build_index, encoder_at, image_paths, index_root
    from clip_pacl.retrieval.metadata import attach_metadata, table_metadata
    from clip_pacl.retrieval.search import load_index_model
    from clip_pacl.retrieval.sharded import index_from_parts
    from clip_pacl.retrieval.store import ImageIndex
    from clip_pacl.retrieval.wds_images import embed_shards, wds_shards

    index = ImageIndex.load(args.index)
    images = index.meta.get("images")
    if not images or index.stats is None:
        raise DataError(f"{args.index} does not record the files it was built from (an older index); "
                        f"rebuild it with `clip-pacl index build`")
    ann = index.meta.get("ann")
    if ann and ann.get("factory"):
        import_faiss("updating an index with an approximate faiss index")  # it must be built again
    shards = wds_shards(images["source"]) if images.get("format") == "wds" else None
    paths = image_paths(images["source"], images.get("image_key", "image")) if shards is None else None
    device = resolve_device(args.device or ("cpu" if index.meta.get("quantize") else None))  # int8: CPU only
    fold_pretrained(args)  # --pretrained folded into --model: an index records weights that load again
    with cli_load_errors():
        model = load_index_model(index, args.model, device=device, random_weights=args.random_weights)  # or refused
    meta = {"model_source": args.model or index.meta.get("model"), "images": images,
            "hub_revision": index.meta.get("hub_revision"), "quantize": index.meta.get("quantize"),
            "root": index_root(index.meta, index.paths),
            "allow_outside_root": bool(index.meta.get("allow_outside_root")),
            "precision": index.meta.get("precision", "fp32")}
    if shards is None:
        updated, unreadable = build_index(model, paths, args.batch_size, args.workers, reuse=index, **meta)
    else:
        encoder = encoder_at(model, meta["quantize"], meta["precision"])  # embedded the way the index was built
        built = index_from_parts(model, [embed_shards(encoder, shards, args.batch_size, args.workers)], len(shards),
                                 **meta)
        updated, unreadable = built.index, built.unreadable
    attach_metadata(updated, table_metadata(images["source"], images.get("image_key", "image")))  # the table's now
    if ann:
        updated.build_ann(**rebuild_request(ann))
    updated.save(args.index)
    summary = {"index": str(args.index), "count": len(updated), "embedded": len(updated) - updated.meta["reused"],
               "reused": updated.meta["reused"], "dropped": len(set(index.paths) - set(updated.paths)),
               "unreadable": [{"path": p, "reason": r} for p, r in unreadable]}
    if args.json:
        print_json(summary)
        return 0
    print(f"updated {args.index}: {summary['count']} images ({summary['embedded']} embedded, {summary['reused']} "
          f"kept, {summary['dropped']} dropped)")
    if unreadable:
        print(f"{len(unreadable)} unreadable images skipped (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    return 0
