"""`clip-pacl serve`: a local web page and JSON API for search, zero-shot classification and segmentation."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from clip_pacl.errors import DataError, MissingDependencyError
from clip_pacl_app.cli.ann_flags import add_ann_flags, query_settings
from clip_pacl_app.cli.common import (
    MODEL_HELP,
    add_device_flag,
    add_int8_flag,
    add_model_flags,
    add_precision_flag,
    fold_pretrained,
    load_device,
    load_model,
    log,
    quantization,
    say_precision,
)
from clip_pacl_app.web.limits import MB, Limits

COMMAND = "serve"
HELP = "serve a web page and JSON API: search an index, classify and segment uploaded images"
DESCRIPTION = (
    "Load the model (and optionally an image index made by `clip-pacl index build`) once, then serve a page "
    "and a JSON API: GET /api/health, GET /api/search?q=TEXT&k=N, POST /api/search (image upload), "
    "POST /api/classify (image + labels), POST /api/segment (image + labels). Only the indexed images are "
    "served, by index id, and only those inside the indexed folder. Binds to 127.0.0.1 unless told otherwise. An "
    "index built with --faiss-index is searched with its approximate faiss index (--nprobe, --ef-search, --rerank "
    "tune it). A PACL model serves an index built by the CLIP it was trained on (searched with that CLIP). Every "
    "request's cost is bounded (--max-prompts, --max-pixels, --decode-budget-mb, --queue; README, \"Web page\")."
)
ORDER = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser, MODEL_HELP + "; if omitted, the model --index records, but only when it is a local "
                                         "checkpoint beside the index (in the index's parent folder)", required=False)
    parser.add_argument("--index", type=Path, default=None, metavar="IDX",
                        help="image index directory to search; without it the search endpoints answer 404")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes the model and the indexed images to the network")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                        help="refuse uploaded request bodies larger than this (413)")
    defaults = Limits()
    parser.add_argument("--max-prompts", type=int, default=defaults.max_prompts, metavar="N",
                        help="refuse (413) a classify or segment request of more than N prompts (labels x templates)")
    parser.add_argument("--prompt-chunk", type=int, default=defaults.prompt_chunk, metavar="N",
                        help="prompts encoded per turn of the model: other requests run between a big request's turns")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels, metavar="N",
                        help="refuse (400) an uploaded image of more than N pixels")
    parser.add_argument("--decode-budget-mb", type=float, default=defaults.decode_budget_bytes / MB, metavar="MB",
                        help="memory for decoded images shared by all requests in flight; a decode waits for its "
                             "share (503 after a while), one that can never fit is refused (413)")
    parser.add_argument("--queue", type=int, default=defaults.queue_depth, metavar="N",
                        help="requests using the model at once (waiting or running); more are answered 503 with "
                             "Retry-After")
    parser.add_argument("--force", action="store_true",
                        help="serve --index even when --model's weights or preprocessing differ from those that "
                             "built it")
    add_ann_flags(parser)
    add_device_flag(parser)
    add_precision_flag(parser)
    add_int8_flag(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from clip_pacl_app.web.app import create_app, is_loopback
    except ImportError:
        raise MissingDependencyError("fastapi and uvicorn", "web", "clip-pacl serve") from None
    from clip_pacl.checkpoint.io import set_precision
    from clip_pacl.models.quantize import quantize as quantize_model
    from clip_pacl.retrieval.search import search_encoder
    from clip_pacl.retrieval.store import ImageIndex
    from clip_pacl.train.record import read_record
    from clip_pacl_app.web.service import WebService

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.model is None and args.index is None:
        raise ValueError("give --model (and optionally --index IDX)")
    limits = _limits(args)
    fold_pretrained(args)  # --pretrained folded into --model: an index records weights that load again
    _check_can_listen(args.host, args.port)  # fail in one line, before minutes of model loading
    index = ImageIndex.load(args.index) if args.index is not None else None
    settings = query_settings(args)
    if index is None and any(v is not None for v in settings.values()):
        raise ValueError("--nprobe, --ef-search and --rerank need --index")
    if index is not None:
        index.uses_ann("auto", **settings)  # settings that cannot apply fail before the model loads
    device = load_device(args)
    source = args.model if args.model is not None else _index_model_source(index, args.index)
    model = load_model(args, source, device=device, precision=None).eval()  # fp32: the fingerprint's weights
    base_clip = index is not None and search_encoder(index, model, force=args.force) is not model
    model = set_precision(quantize_model(model, quantization(args), inplace=True), args.precision)
    say_precision(args, model.precision)
    if index is not None:
        recorded = index.meta.get("model")
        if args.model is not None and recorded and _source(args.model) != recorded and not base_clip:
            log(f"warning: the index was built with {recorded}; searching it with {args.model}")
        if base_clip:
            log(f"searching {args.index} with the PACL model's base CLIP (the weights that built it)")
        if index.meta.get("allow_outside_root"):
            log(f"warning: {args.index} was built with --allow-outside-root: images outside its folder are served")
    service = WebService(model, index, model_name=str(source), index_name=str(args.index or ""),
                         search_settings=settings, limits=limits, search_model=model.clip if base_clip else model,
                         trained_on=read_record(source))
    model_name = source
    app = create_app(service, max_upload_bytes=round(args.max_upload_mb * 2**20), host=args.host)
    if not is_loopback(args.host):
        log(f"warning: listening on {args.host}: anyone who can reach this machine can use the model and see "
            f"the indexed images")
    log(f"serving {model_name}" + (f" with {len(index)} indexed images" if index is not None else "")
        + f" on http://{_url_host(args.host)}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _limits(args: argparse.Namespace) -> Limits:
    if args.decode_budget_mb <= 0:
        raise ValueError(f"--decode-budget-mb must be positive, got {args.decode_budget_mb}")
    for flag in ("max_prompts", "prompt_chunk", "max_pixels", "queue"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return Limits(max_prompts=args.max_prompts, prompt_chunk=args.prompt_chunk, max_pixels=args.max_pixels,
                  decode_budget_bytes=round(args.decode_budget_mb * MB), queue_depth=args.queue)


def _index_model_source(index, index_dir: Path) -> str:
    """The model an index records, when serve may load it unasked: a local checkpoint beside the index (in the
    index's parent folder, as `clip-pacl demo` lays them out). A model named elsewhere (another folder, the hub)
    is loaded only when --model names it: an index from someone else must not choose what the server loads."""
    recorded = index.meta.get("model")
    if not recorded:
        raise DataError(f"{index_dir} does not record its model; pass --model")
    if not index.meta.get("model_has_weights", True):
        raise DataError(f"{index_dir} was built with '{recorded}', a randomly initialised model that cannot be "
                        f"loaded again; pass --model with a checkpoint")
    home = Path(index_dir).resolve().parent
    path = Path(recorded)
    if not (path.is_absolute() and path.exists() and path.resolve().is_relative_to(home)):
        raise DataError(f"{index_dir} records its model as '{recorded}', which is not beside the index (under "
                        f"{home}); pass --model to load it")
    return recorded


def _source(model: str) -> str:
    from clip_pacl.retrieval.build import model_source_string

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
