"""Which indexed images the server may open and list: those inside the folder that was indexed.

An index is a list of paths, and whoever can write `paths.jsonl` (or put a symlink in the indexed folder) could
otherwise make the server show any image the server's user can read. Every row is checked against the index's
root (`retrieval.build.index_root`: the folder that was indexed, or a table's folder), lexically once at start,
and again with symlinks resolved each time it is about to be served or listed. Rows outside are never
thumbnailed nor listed, unless the index was built with `index build --allow-outside-root` (recorded in
meta.json). A webdataset row (`SHARD#KEY`) is checked by its shard's path.
"""

from __future__ import annotations

import os

from clip_pacl.retrieval.build import index_root
from clip_pacl.retrieval.store import ImageIndex


class Confinement:
    """`servable(row)`: whether row `row` of an index resolves inside its root (always, when outside is allowed)."""

    def __init__(self, paths: list[str], root: str | None, allow_outside: bool, webdataset: bool = False):
        self.paths = paths
        self.allow_outside = allow_outside or root is None
        self.webdataset = webdataset
        self.root = os.path.realpath(root) if root is not None else None
        lexical_root = os.path.normpath(root) if root is not None else None
        self.outside = 0 if self.allow_outside else sum(
            not _inside(os.path.normpath(self._file(p)), lexical_root) for p in paths)

    @classmethod
    def of(cls, index: ImageIndex) -> Confinement:
        webdataset = (index.meta.get("images") or {}).get("format") == "wds"
        return cls(index.paths, index_root(index.meta, index.paths), bool(index.meta.get("allow_outside_root")),
                   webdataset)

    def _file(self, path: str) -> str:
        return path.rsplit("#", 1)[0] if self.webdataset else path

    def servable(self, row: int) -> bool:
        if self.allow_outside:
            return True
        return _inside(os.path.realpath(self._file(self.paths[row])), self.root)

    def widened(self, k: int) -> int:
        """How many hits to ask a search for, so that k remain once the rows outside the root are left out."""
        return min(len(self.paths), k + self.outside) if self.outside else k


def _inside(path: str, root: str) -> bool:
    return os.path.isabs(path) and (path == root or path.startswith(root.rstrip(os.sep) + os.sep))
