"""Progress messages for people: one line on stderr, so stdout stays free for results (`--json`)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    """Print `msg` as one line on stderr, flushed at once (progress shows even when stderr is piped)."""
    print(msg, file=sys.stderr, flush=True)


def human_bytes(n: int) -> str:
    """A size for an error message: `512 bytes`, `16.0 KiB`, `1.5 GiB`."""
    size, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
