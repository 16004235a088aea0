"""`clip-pacl info`: what a checkpoint is (architecture, parameter counts) and where its weights came from."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.common import (
    add_json_flag,
    add_quick_gelu_flag,
    add_weights_flags,
    cli_load_errors,
    fold_pretrained,
    print_json,
)

COMMAND = "info"
HELP = "describe a model: architecture, parameter counts, checkpoint format and origin"
DESCRIPTION = (
    "Read any model clip-pacl loads (our checkpoint dir, a Hugging Face CLIP dir, an OpenAI .pt, an open_clip "
    "state dict or config, a preset, a hub repo id) and print its architecture, its parameter counts per tower "
    "and the format the weights were read from."
)
ORDER = 80


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint path, hub repo id, or preset name (with its weights "
                                                   "named, ViT-B-32:openai, or --random-weights)")
    add_weights_flags(parser)
    add_quick_gelu_flag(parser)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.checkpoint.summary import summarize

    args.model = args.src
    fold_pretrained(args)
    with cli_load_errors("SRC"):
        info = summarize(args.model, quick_gelu=args.quick_gelu, random_weights=args.random_weights)
    if args.json:
        print_json(info)
        return 0
    source = info["source"]
    print(f"model:      {info['model']}")
    print(f"format:     {source['format']}")
    print(f"location:   {source['location']}" + (f"  (hub: {source['hub_id']})" if source["hub_id"] else ""))
    print(f"weights:    {info['weights']}")
    if "architecture" in info:
        arch = info["architecture"]
        image, text = arch["image_tower"], arch["text_tower"]
        shape = f"patch {image['patch_size']}, " if image["type"] == "ViT" else ""
        print(f"image:      {image['type']} width {image['width']}, layers {image['layers']}, heads {image['heads']}, "
              f"{shape}image size {image['image_size']}")
        print(f"text:       width {text['width']}, layers {text['layers']}, heads {text['heads']}, "
              f"context {text['context_length']}, vocab {text['vocab_size']}")
        print(f"embed dim:  {arch['embed_dim']}")
        print(f"activation: {arch['activation']}")
    params = info["parameters"]
    print(f"parameters: {params['total']:,} (image {params['image_tower']:,}, text {params['text_tower']:,}, "
          f"other {params['other']:,})")
    return 0
