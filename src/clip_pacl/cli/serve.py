"""`clip-pacl serve`: a local web page and JSON API for search, zero-shot classification and segmentation."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from clip_pacl.cli.ann_flags import add_ann_flags, query_settings
from clip_pacl.cli.common import (
    MODEL_HELP,
    add_device_flag,
    add_int8_flag,
    add_model_flags,
    cli_load_errors,
    fold_pretrained,
    load_device,
    load_model,
    log,
    quantization,
)
from clip_pacl.errors import MissingDependencyError

COMMAND = "serve"
HELP = "serve a web page and JSON API: search an index, classify and segment uploaded images"
DESCRIPTION = (
    "Load the model (and optionally an image index made by `clip-pacl index build`) once, then serve a page "
    "and a JSON API: GET /api/health, GET /api/search?q=TEXT&k=N, POST /api/search (image upload), "
    "POST /api/classify (image + labels), POST /api/segment (image + labels). Only the indexed images are "
    "served, by index id. Binds to 127.0.0.1 unless told otherwise. An index built with --faiss-index is searched "
    "with its approximate faiss index (--nprobe, --ef-search, --rerank tune it)."
)
ORDER = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, MODEL_HELP + "; if omitted, the model recorded in --index", required=False)
    parser.add_argument("--index", type=Path, default=None, metavar="IDX",
                        help="image index directory to search; without it the search endpoints answer 404")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes the model and the indexed images to the network")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                        help="refuse uploaded request bodies larger than this (413)")
    parser.add_argument("--force", action="store_true",
                        help="serve --index even when --model's weights or preprocessing differ from those that "
                             "built it")
    add_ann_flags(parser)
    add_device_flag(parser)
    add_int8_flag(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from clip_pacl.web.app import create_app, is_loopback
    except ImportError:
        raise MissingDependencyError("fastapi and uvicorn", "web", "clip-pacl serve") from None
    from clip_pacl.retrieval.index import ImageIndex
    from clip_pacl.retrieval.search import load_index_model
    from clip_pacl.web.service import WebService

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.model is None and args.index is None:
        raise ValueError("give --model (and optionally --index IDX)")
    fold_pretrained(args)  # --pretrained folded into --model: an index records weights that load again
    _check_can_listen(args.host, args.port)  # fail in one line, before minutes of model loading
    index = ImageIndex.load(args.index) if args.index is not None else None
    settings = query_settings(args)
    if index is None and any(v is not None for v in settings.values()):
        raise ValueError("--nprobe, --ef-search and --rerank need --index")
    if index is not None:
        index.uses_ann("auto", **settings)  # settings that cannot apply fail before the model loads
    device = load_device(args)
    if index is not None:
        with cli_load_errors():
            model = load_index_model(index, args.model, device=device, force=args.force, quantize=quantization(args),
                                     random_weights=args.random_weights)
        recorded = index.meta.get("model")
        if args.model is not None and recorded and _source(args.model) != recorded:
            log(f"warning: the index was built with {recorded}; searching it with {args.model}")
    else:
        model = load_model(args, device=device, quantize=quantization(args)).eval()
    model_name = args.model or index.meta.get("model", "")
    service = WebService(model, index, model_name=str(model_name), index_name=str(args.index or ""),
                         search_settings=settings)
    app = create_app(service, max_upload_bytes=round(args.max_upload_mb * 2**20), host=args.host)
    if not is_loopback(args.host):
        log(f"warning: listening on {args.host}: anyone who can reach this machine can use the model and see "
            f"the indexed images")
    log(f"serving {model_name}" + (f" with {len(index)} indexed images" if index is not None else "")
        + f" on http://{_url_host(args.host)}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _source(model: str) -> str:
    from clip_pacl.retrieval.index import model_source_string

    return model_source_string(model)


def _check_can_listen(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
