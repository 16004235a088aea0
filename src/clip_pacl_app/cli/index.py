"""`clip-pacl index build`: embed a folder (or a file's image column) into a searchable image index."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from clip_pacl_app.cli.ann_flags import add_ann_flags, add_faiss_index_flag, build_options
from clip_pacl_app.cli.common import (
    add_device_flag,
    add_int8_flag,
    add_json_flag,
    add_precision_flag,
    add_weights_flags,
    fold_pretrained,
    load_device,
    load_model_with_source,
    log,
    print_json,
    quantization,
    say_precision,
)

if TYPE_CHECKING:
    import torch

    from clip_pacl.train.distributed import DistInfo

COMMAND = "index build"
GROUP_HELP = "image index commands"
HELP = "embed images into an index for `clip-pacl search` and `clip-pacl serve`"
DESCRIPTION = (
    "Embed every image under a folder (recursively), or every image of a CSV/TSV/JSONL file's image "
    "column, and write IDX/embeddings.npy (float32, normalised), IDX/paths.jsonl and IDX/meta.json "
    "(with a fingerprint of the weights and preprocessing, which queries must match). Unreadable images are "
    "skipped and counted. The index is written beside IDX and renamed into place: an existing index is "
    "replaced whole or not at all. A table's other columns (caption, ...) are stored per image and come back "
    "with search results. Launched by torchrun (`torchrun --nnodes N --nproc-per-node M -m clip_pacl_app index "
    "build ...`, same flags), each rank embeds a block of the images and rank 0 merges them into the same index, "
    "in input order; IDX must then be on a filesystem every node sees. With --faiss-index, IDX/ann.faiss adds "
    "approximate search for large collections (meta.json's \"ann\" records what was built; under torchrun rank 0 "
    "builds it after the merge)."
)
ORDER = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_weights_flags(parser)
    parser.add_argument("--model", required=True,
                        help="checkpoint dir or model file (its path is recorded in meta.json)")
    parser.add_argument("--images", required=True, type=Path, metavar="DIR|FILE|SHARDS",
                        help="a folder of images (searched recursively), a CSV/TSV/JSONL file with an image column, "
                             "or local webdataset shards ('shards/{000000..000009}.tar', a .tar, or a folder of "
                             ".tar files): each sample's image, named SHARD#KEY, with its txt/json as metadata")
    parser.add_argument("--out", required=True, type=Path, metavar="IDX", help="index directory to write")
    parser.add_argument("--image-key", default="image", help="image column when --images is a file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="index images that resolve outside the --images folder (or the table's folder): "
                             "symlinks or table rows leading elsewhere; recorded in meta.json, and `clip-pacl serve` "
                             "then shows them too (without it the build refuses them)")
    add_faiss_index_flag(parser)
    add_ann_flags(parser, build=True)
    add_device_flag(parser)
    add_precision_flag(parser)
    add_int8_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.retrieval.ann import check_request
    from clip_pacl.retrieval.build import confine_paths, image_paths, images_root
    from clip_pacl.retrieval.metadata import attach_metadata, table_metadata
    from clip_pacl.retrieval.store import ImageIndex
    from clip_pacl.retrieval.wds_images import wds_shards, wds_source
    from clip_pacl.train.distributed import env_dist_info

    ImageIndex.check_target(args.out)  # a wrong --out fails now, not after minutes of embedding
    ann_options = build_options(args)
    if args.faiss_index is None and any(v is not None for v in ann_options.values()):
        raise ValueError("--nprobe, --ef-search, --rerank and --faiss-train-size need --faiss-index")
    shards = wds_shards(args.images)
    inputs = shards if shards is not None else image_paths(args.images, args.image_key)
    info = env_dist_info()
    fold_pretrained(args)  # --pretrained folded into --model: an index records weights that load again
    model, source = load_model_with_source(args, device=_device(args, info), precision=None)  # float32: the
    # fingerprint is the source weights'; the images are encoded at --precision (`encoder_at`)
    if args.faiss_index is not None:
        check_request(args.faiss_index, model.embed_dim, **ann_options)  # fail before minutes of embedding
    images = {"source": str(args.images.resolve()), "image_key": args.image_key} if shards is None else \
        {"source": wds_source(args.images), "format": "wds"}
    root = confine_paths(inputs, images_root(args.images), args.allow_outside_root) if shards is None else \
        confine_paths([Path(s).resolve() for s in shards], None)
    index, unreadable, per_rank = _build(args, model, inputs, shards is not None, images, source.revision, info,
                                         root)
    if index is None:
        return 0  # a sharded build's other ranks: rank 0 saves and reports
    attach_metadata(index, table_metadata(args.images, args.image_key))
    if args.faiss_index is not None:  # after a sharded build's merge too: rank 0 builds it over every rank's rows
        log(f"building the faiss index '{args.faiss_index}' over {len(index)} embeddings")
        index.build_ann(args.faiss_index, **ann_options)
    index.save(args.out)
    if not index.meta["model_has_weights"]:
        log(f"warning: '{args.model}' is randomly initialised; searching {args.out} will need --model")
    summary = {"index": str(args.out), **index.meta,
               "unreadable": [{"path": p, "reason": r} for p, r in unreadable]}
    if per_rank is not None:
        summary["unreadable_per_rank"] = per_rank
    if args.json:
        print_json(summary)
        return 0
    print(f"indexed {len(index)} images ({index.embed_dim}-d) into {args.out}")
    if index.meta.get("ann"):
        ann = index.meta["ann"]
        print(f"approximate search: faiss '{ann['factory']}' (rerank {ann['rerank']})" if ann["factory"] else
              f"approximate search: none, '{ann['requested']}' chose exact search for {len(index)} images")
    if unreadable:
        print(f"{len(unreadable)} unreadable images skipped (e.g. {unreadable[0][0]}: {unreadable[0][1]})"
              + (f"; per rank: {', '.join(map(str, per_rank))}" if per_rank is not None else ""))
    return 0


def _device(args: argparse.Namespace, info: DistInfo) -> torch.device:
    """--device (the CPU under --int8); under torchrun, `cuda` means this rank's own GPU (its local rank)."""
    import torch

    device = load_device(args)
    if info.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    return device


def _build(args: argparse.Namespace, model: torch.nn.Module, inputs: list, webdataset: bool,
           images: dict[str, str], revision: str | None, info: DistInfo, root: str | None):
    """(index or None on ranks other than 0, unreadable [(path, reason)], unreadable count per rank or None).
    `inputs`: image paths, or webdataset shards; `root`: the folder they resolve inside (`confine_paths`)."""
    from clip_pacl.checkpoint.io import effective_precision
    from clip_pacl.retrieval.build import build_index, encoder_at
    from clip_pacl.retrieval.sharded import build_index_sharded, embed_files, index_from_parts
    from clip_pacl.retrieval.wds_images import embed_shards

    meta = {"model_source": args.model, "images": images, "hub_revision": revision, "quantize": quantization(args),
            "root": root, "allow_outside_root": args.allow_outside_root,
            "precision": effective_precision(args.precision, quantization(args), next(model.parameters()).device)}
    say_precision(args, meta["precision"])
    if not info.enabled and not webdataset:
        index, unreadable = build_index(model, inputs, args.batch_size, args.workers, **meta)
        return index, unreadable, None
    encoder = encoder_at(model, meta["quantize"], meta["precision"])  # every rank encodes its copy the same way
    embed = partial(embed_shards if webdataset else embed_files, encoder, batch_size=args.batch_size,
                    workers=args.workers, progress=info.is_main)
    if not info.enabled:
        built = index_from_parts(model, [embed(inputs)], len(inputs), **meta)
        return built.index, built.unreadable, None
    built = build_index_sharded(model, inputs, args.out, embed, **meta)
    return built.index, built.unreadable, built.unreadable_per_rank
