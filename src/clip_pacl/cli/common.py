"""Helpers shared by subcommands: JSON output, device choice."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from clip_pacl.console import log
from clip_pacl.device import resolve_device
from clip_pacl.errors import ConfigError

if TYPE_CHECKING:  # every module here imports torch and the library only in `run`: `--help` starts at once
    import torch

__all__ = ["add_device_flag", "add_int8_flag", "add_json_flag", "load_device", "log", "print_json", "print_per_class",
           "quantization", "resolve_device"]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def add_int8_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--int8", action="store_true",
                        help="encode with the linear layers dynamically quantized to int8 (CPU only: ViT image "
                             "encoding about 2x float32 on the x86 CPU measured, embeddings within a cosine of 0.99 "
                             "of float32's; ResNet image towers stay float32)")


def quantization(args: argparse.Namespace) -> str | None:
    """`quantize=` for `clip_pacl.load` from the --int8 flag."""
    return "int8" if getattr(args, "int8", False) else None


def load_device(args: argparse.Namespace) -> torch.device:
    """--device, or the CPU under --int8 (int8 layers run only there: another device is refused)."""
    if not quantization(args):
        return resolve_device(args.device)
    device = resolve_device(args.device or "cpu")
    if device.type != "cpu":
        raise ConfigError(f"--int8 runs on the CPU only; drop --device {args.device}")
    return device


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def print_per_class(title: str, values: dict[str, float | None], limit: int) -> None:
    """An indented per-class percentage table, or a pointer to --json when there are more than `limit` classes."""
    if len(values) > limit:
        print(f"  ({title} of {len(values)} classes: use --json)")
        return
    width = max(len(name) for name in values)
    print(f"  {title}:")
    for name, value in values.items():
        print(f"    {name:<{width}}  " + ("   n/a (absent)" if value is None else f"{100 * value:6.2f} %"))
