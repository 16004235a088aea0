"""Helpers shared by subcommands: JSON output, device choice."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from clip_pacl.console import log
from clip_pacl.device import resolve_device
from clip_pacl.errors import ConfigError

if TYPE_CHECKING:  # every module here imports torch and the library only in `run`: `--help` starts at once
    import torch

__all__ = ["add_device_flag", "add_int8_flag", "add_json_flag", "add_model_flags", "add_precision_flag",
           "add_weights_flags", "cli_load_errors", "fold_pretrained", "load_device", "load_model",
           "load_model_with_source", "log", "print_json", "print_per_class", "quantization", "resolve_device",
           "say_precision"]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


MODEL_HELP = "a checkpoint dir, training run dir, model file, hub repo id, or a preset with its weights named"


def add_model_flags(parser: argparse.ArgumentParser, help: str = MODEL_HELP, required: bool = True) -> None:
    """--model, with --pretrained and --random-weights (`add_weights_flags`)."""
    parser.add_argument("--model", required=required, default=None,
                        help=help + " (a preset alone refuses: MODEL:TAG such as ViT-B-32:openai, or --pretrained "
                                    "TAG, names its weights; --random-weights asks for random ones)")
    add_weights_flags(parser)


def add_weights_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", default=None, metavar="TAG|FILE",
                        help="weights for a preset model, as open_clip names them (--model ViT-B-32 --pretrained "
                             "openai is --model ViT-B-32:openai), or a weights file")
    parser.add_argument("--random-weights", action="store_true",
                        help="accept a preset with no pretrained weights: a randomly initialised model, whose "
                             "outputs mean nothing (for tests and smoke runs)")


def fold_pretrained(args: argparse.Namespace) -> None:
    """Fold --pretrained into --model (`ViT-B-32:openai`, open_clip's MODEL:PRETRAINED), so that what a command
    records (an index's meta.json) loads the same weights again. It names a preset's weights: anything else is
    refused rather than ignored."""
    from clip_pacl.checkpoint.io import is_preset_name

    pretrained = getattr(args, "pretrained", None)
    if pretrained is None:
        return
    if args.model is None:
        raise ConfigError("--pretrained names weights for --model; give --model")
    if not is_preset_name(args.model):
        raise ConfigError(f"--pretrained names the weights of a preset --model (such as ViT-B-32); "
                          f"'{args.model}' is not a preset")
    args.model, args.pretrained = f"{args.model}:{pretrained}", None


@contextmanager
def cli_load_errors(flag: str = "--model", pretrained_flag: bool = True) -> Iterator[None]:
    """`load`'s refusals in CLI words: the flags that name weights, the argument that takes a local copy."""
    from clip_pacl.checkpoint.hub import HubUnreachableError
    from clip_pacl.checkpoint.io import RandomWeightsError

    try:
        yield
    except RandomWeightsError as e:
        ways = f"{flag} MODEL:TAG" + (" or --pretrained TAG|FILE" if pretrained_flag else "")
        raise RandomWeightsError(f"{str(e).split(';')[0]}; name its weights ({ways}, e.g. ViT-B-32:openai) or pass "
                                 "--random-weights") from None
    except HubUnreachableError as e:
        raise HubUnreachableError(f"{e} ({flag} DIR)") from None


def load_model_with_source(args: argparse.Namespace, src: str | None = None, flag: str = "--model",
                           **kwargs: Any) -> tuple[Any, Any]:
    """`load_with_source` of --model (or `src`) with --pretrained / --random-weights, its refusals in CLI words."""
    from clip_pacl.checkpoint.io import load_with_source

    if src is None:
        fold_pretrained(args)
    kwargs.setdefault("precision", getattr(args, "precision", None))
    with cli_load_errors(flag, pretrained_flag=hasattr(args, "pretrained")):
        model, source = load_with_source(args.model if src is None else src,
                                         random_weights=bool(getattr(args, "random_weights", False)), **kwargs)
    if kwargs["precision"] is not None:  # None: the caller sets the precision later (and says it then)
        say_precision(args, model.precision)
    return model, source


def load_model(args: argparse.Namespace, src: str | None = None, **kwargs: Any) -> Any:
    return load_model_with_source(args, src, **kwargs)[0]


def add_quick_gelu_flag(parser: argparse.ArgumentParser) -> None:
    """--no-quick-gelu (`args.quick_gelu`: False, or None when not given), for the commands that read weights as
    they are (convert, info)."""
    parser.add_argument("--no-quick-gelu", dest="quick_gelu", action="store_const", const=False, default=None,
                        help="use GELU, not QuickGELU: bare state dicts otherwise mean QuickGELU (OpenAI's "
                             "convention); this also overrides what a checkpoint's config records")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    from clip_pacl.device import PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the towers' weights: fp32 (default: exact parity with the source weights), bf16 (half "
                             "the memory; faster on CPUs with AMX or AVX-512 BF16 and on GPUs, features within a "
                             "cosine of 0.999 of fp32's) or auto (bf16 where that hardware is, else fp32); stderr "
                             "and --json say which ran")


def say_precision(args: argparse.Namespace, ran: str) -> None:
    """Tell stderr which precision the model runs at when --precision asked for other than the default fp32
    (`auto` decides by the hardware)."""
    asked = getattr(args, "precision", None)
    if asked not in (None, "fp32"):  # the default is exact fp32 and says nothing; what was asked for is told
        log(f"precision: {ran}" + (" (auto)" if asked == "auto" else ""))


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
