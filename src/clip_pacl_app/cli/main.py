"""The `clip-pacl` command: discovers subcommands in this package and turns errors into one line.

Each module here that defines COMMAND ("train", or "eval zeroshot" for a nested command), HELP,
add_arguments(parser) and run(args) -> int becomes a subcommand. Modules stay thin: parse, call
the library, print.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from types import ModuleType

import clip_pacl_app.cli as cli_pkg
from clip_pacl.errors import ClipPaclError


def _command_modules() -> list[ModuleType]:
    mods = []
    for info in pkgutil.iter_modules(cli_pkg.__path__):
        if info.name in ("main", "common") or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"clip_pacl_app.cli.{info.name}")
        if hasattr(mod, "COMMAND"):
            mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 50), m.COMMAND))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-pacl",
        description="Train, convert, evaluate and serve CLIP models; segment images by text with PACL.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for mod in _command_modules():
        words = mod.COMMAND.split()
        target = sub
        if len(words) == 2:
            if words[0] not in groups:
                group_parser = sub.add_parser(words[0], help=getattr(mod, "GROUP_HELP", f"{words[0]} commands"))
                groups[words[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
                group_parser.set_defaults(_group_parser=group_parser)
            target = groups[words[0]]
        p = target.add_parser(words[-1], help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                              formatter_class=HelpFormatter)
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it informs: not for None/False defaults or help that names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        (getattr(args, "_group_parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ClipPaclError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
