"""The approximate-search flags `index build`, `search` and `serve` share (`retrieval/ann.py`)."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.defaults import AUTO_MIN_VECTORS, AUTO_RERANK


def add_ann_flags(parser: argparse.ArgumentParser, build: bool = False) -> None:
    """--nprobe, --ef-search, --rerank: the defaults saved with a new index (`build`), else a query's settings."""
    when = "saved with the index as the default for queries" if build else "default: the value saved with the index"
    parser.add_argument("--nprobe", type=int, default=None, metavar="N",
                        help=f"inverted lists an IVF faiss index visits per query: more is slower and finds more "
                             f"of the true neighbours ({when}; faiss's own default is 1)")
    parser.add_argument("--ef-search", type=int, default=None, metavar="N",
                        help=f"candidate list length of an HNSW faiss index's search: more is slower and finds more "
                             f"of the true neighbours ({when}; faiss's own default is 16)")
    parser.add_argument("--rerank", type=int, default=None, metavar="N",
                        help=f"ask the faiss index for N x k candidates, score them exactly against the embeddings "
                             f"and keep the best k ({when}; {AUTO_RERANK} for 'auto', else 1)")


def add_faiss_index_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faiss-index", default=None, metavar="FACTORY|auto",
                        help="also build an approximate faiss index, IDX/ann.faiss, that `search` and `serve` then "
                             "use: a faiss factory string ('PQ256x4fs': 4-bit PQ fast scan of every vector, "
                             "'HNSW32', 'IVF4096,PQ32', 'OPQ32,IVF4096,PQ32'...), trained on a seeded sample of the "
                             f"embeddings, or 'auto': exact search below {AUTO_MIN_VECTORS:,} images, else "
                             f"PQ<D/2>x4fs with --rerank {AUTO_RERANK} (see README, 'Search at scale'); needs "
                             "clip-pacl[faiss]. Default: none, exact search")
    parser.add_argument("--faiss-train-size", type=int, default=None, metavar="N",
                        help="embeddings sampled to train the faiss index (default: all up to 65,536, or 40 per "
                             "IVF list)")


def build_options(args: argparse.Namespace) -> dict[str, int | None]:
    """The `ImageIndex.build_ann` options the flags give."""
    return {"nprobe": args.nprobe, "ef_search": args.ef_search, "rerank": args.rerank,
            "train_size": args.faiss_train_size}


def query_settings(args: argparse.Namespace) -> dict[str, int | None]:
    """The `ImageIndex.search` settings the flags give (None: the index's saved ones)."""
    return {"nprobe": args.nprobe, "ef_search": args.ef_search, "rerank": args.rerank}
