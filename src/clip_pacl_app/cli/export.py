"""`clip-pacl export onnx`: the image and text encoders as ONNX graphs for onnxruntime."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.common import add_json_flag, add_model_flags, load_model, log, print_json

COMMAND = "export onnx"
GROUP_HELP = "export models for other runtimes"
HELP = "export the image and text encoders to ONNX"
DESCRIPTION = (
    "Write image_encoder.onnx ((B, 3, H, W) normalised pixels -> L2-normalised features), text_encoder.onnx "
    "((B, context) int64 token ids -> L2-normalised features) and clip_onnx.json (input sizes, mean/std, "
    "context length, logit scale) to --out. B is dynamic unless --static-batch."
)
ORDER = 82


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from clip_pacl_app.cli.defaults import DEFAULT_OPSET

    add_model_flags(parser)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch dimension at 1 (default: dynamic, any batch size), which lets some "
                             "runtimes fold more shapes")
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.formats.onnx import export_onnx

    model = load_model(args)
    log(f"exporting {args.model} to ONNX (opset {args.opset})")
    meta = export_onnx(model, args.out, opset=args.opset, batch_dynamic=not args.static_batch)
    if args.json:
        print_json(meta)
    else:
        print(f"wrote {meta['image_encoder']}, {meta['text_encoder']} and clip_onnx.json to {meta['dir']}")
    return 0
