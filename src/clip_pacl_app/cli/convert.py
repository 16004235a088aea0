"""`clip-pacl convert`: rewrite a checkpoint in Hugging Face, open_clip or clip-pacl format."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.common import (
    add_json_flag,
    add_quick_gelu_flag,
    add_weights_flags,
    load_model_with_source,
    log,
    print_json,
)

COMMAND = "convert"
HELP = "convert a checkpoint to Hugging Face, open_clip or clip-pacl format"
DESCRIPTION = (
    "Read any model clip-pacl loads and write it as a Hugging Face CLIP directory (--to hf; "
    "transformers.CLIPModel.from_pretrained reads it), an open_clip state dict + open_clip_config.json "
    "(--to open_clip; DST ending in .pt/.bin/.safetensors is the weights file, otherwise a hub-style directory), "
    "or a clip-pacl checkpoint directory (--to clip_pacl). Tensors are renamed, never changed."
)
ORDER = 81


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint path, preset name or hub repo id")
    parser.add_argument("--to", required=True, choices=("hf", "open_clip", "clip_pacl"), help="output format")
    parser.add_argument("--out", required=True, metavar="DST", help="output directory (or weights file for open_clip)")
    add_weights_flags(parser)
    add_quick_gelu_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.formats import export

    args.model = args.src
    model, source = load_model_with_source(args, flag="SRC", quick_gelu=args.quick_gelu)
    log(f"read {source.format} {source.hub_id or source.location}")
    out = export(model, args.to, args.out)
    result = {"src": args.src, "src_format": source.format, "to": args.to, "out": str(out)}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {args.to} checkpoint to {out}")
    return 0
