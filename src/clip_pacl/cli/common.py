"""Helpers shared by subcommands: JSON output, device choice."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clip_pacl.console import log
from clip_pacl.device import resolve_device

__all__ = ["add_device_flag", "add_json_flag", "log", "print_json", "print_per_class", "resolve_device"]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


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
