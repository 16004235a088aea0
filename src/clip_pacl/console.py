"""Progress messages for people: one line on stderr, so stdout stays free for results (`--json`)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    """Print `msg` as one line on stderr, flushed at once (progress shows even when stderr is piped)."""
    print(msg, file=sys.stderr, flush=True)
