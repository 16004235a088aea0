"""Atomic writes on disk: a file or a whole directory appears complete, or not at all (no torch, no numpy).

A file (`atomic_write`) is written to a temporary file beside it and renamed over it. A directory
(`write_directory`: an image index, a training checkpoint) is written into a temporary sibling, every file
in it fsynced, then swapped in by two renames: the old directory is set aside under a second sibling name,
the new one renamed into place, and the old one removed last. A process killed at any moment leaves
the old directory, or the new one, or the old one set aside with no new one: `recover_directory` (which
`write_directory` runs first) puts it back. Temporary siblings a killed write left are removed by the next
write of the same directory. The callers choose the sibling names (their on-disk layouts predate this module).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path` (an atomic replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_directory(target: Path, write: Callable[[Path], Any], *, temp_prefix: str, aside_name: str,
                    complete: Callable[[Path], bool] = Path.is_dir) -> Path:
    """Replace the directory `target` (or create it) with what `write(folder)` puts in an empty folder, atomically.

    The folder is the sibling `temp_prefix` + this process's id; the old `target` is set aside as the sibling
    `aside_name` between the two renames. `complete(path)` says whether a directory is a finished one (for
    `recover_directory`). When `write` raises, the temporary folder is removed and `target` is untouched; a
    process killed (or a rename failing) between the two renames leaves the old one set aside, which the next
    write or `recover_directory` puts back.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target, parent / aside_name, complete)
    for stale in parent.glob(glob.escape(temp_prefix) + "*"):  # left by a killed write
        shutil.rmtree(stale, ignore_errors=True)
    temp = parent / f"{temp_prefix}{os.getpid()}"
    temp.mkdir()
    try:
        write(temp)
        fsync_tree(temp)
        if target.exists():
            os.replace(target, parent / aside_name)
        os.replace(temp, target)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    shutil.rmtree(parent / aside_name, ignore_errors=True)
    return target


def recover_directory(target: Path, aside: Path, complete: Callable[[Path], bool] = Path.is_dir) -> None:
    """Finish what a killed `write_directory` left: the old directory it had set aside (`aside`) goes back to
    `target` when no complete new one arrived there; otherwise the set-aside copy is removed."""
    if not aside.exists():
        return
    if complete(aside) and not complete(target):
        if target.exists():
            shutil.rmtree(target)
        os.replace(aside, target)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, and `folder` itself: its contents and names reach the disk
    before a rename makes them visible, so a power cut cannot leave a renamed directory of empty files."""
    for path in sorted(folder.rglob("*"), key=lambda p: (p.is_dir(), -len(p.parts))):  # files, then folders
        fsync_path(path)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """fsync one file, or one directory (so that the names in it, and renames into it, survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
