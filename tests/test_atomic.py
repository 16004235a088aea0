"""clip_pacl.atomic: a directory written by `write_directory` is the old one or the new one whatever happens, and
`recover_directory` puts back an old one a killed write had set aside (the index store and training checkpoints
both rely on it: tests/test_index_atomic.py, tests/test_resume.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clip_pacl import atomic

# A write of TARGET killed (SIGKILL) between its two renames: the old TARGET set aside, the new one not renamed in.
# It prints the heavy libraries the helper imported (it must import none).
KILLED_WRITE = """
import json, os, signal, sys
from pathlib import Path
import clip_pacl.atomic as atomic
target = Path(sys.argv[1])
real_replace = os.replace
def replace(src, dst):
    if Path(src).name.startswith(".t.tmp-"):  # the second rename
        print(json.dumps(sorted(m for m in ("torch", "numpy") if m in sys.modules)), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
atomic.write_directory(target, lambda d: (d / "f").write_text("new"), temp_prefix=".t.tmp-", aside_name=".t.old")
"""


def _write(target: Path, text: str, **kwargs) -> Path:
    return atomic.write_directory(target, lambda d: (d / "f").write_text(text), temp_prefix=".t.tmp-",
                                  aside_name=".t.old", **kwargs)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_write_replaces_the_directory_whole(tmp_path):
    target = tmp_path / "t"
    _write(target, "old")
    (target / "extra").write_text("only in the old one")
    _write(target, "new")
    assert _names(target) == ["f"] and (target / "f").read_text() == "new"
    assert _names(tmp_path) == ["t"]


def test_a_write_that_raises_midway_leaves_the_old_directory_and_no_temporary(tmp_path):
    target = tmp_path / "t"
    _write(target, "old")

    def half_write(folder: Path) -> None:
        (folder / "f").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_directory(target, half_write, temp_prefix=".t.tmp-", aside_name=".t.old")
    assert _names(tmp_path) == ["t"] and (target / "f").read_text() == "old"


def test_a_write_killed_between_set_aside_and_rename_is_recovered(tmp_path):
    target = tmp_path / "t"
    _write(target, "old")
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -9, done.stderr
    assert json.loads(done.stdout) == []  # torch-free
    left = _names(tmp_path)
    assert "t" not in left and ".t.old" in left and any(n.startswith(".t.tmp-") for n in left)
    assert (tmp_path / ".t.old" / "f").read_text() == "old"

    atomic.recover_directory(target, tmp_path / ".t.old")
    assert (target / "f").read_text() == "old" and ".t.old" not in _names(tmp_path)
    _write(target, "newer")  # the next write clears the killed one's temporary
    assert _names(tmp_path) == ["t"] and (target / "f").read_text() == "newer"


def test_the_next_write_recovers_before_it_sets_anything_aside(tmp_path):
    """A write after a kill between the renames must put the old directory back first: otherwise its own set-aside
    step would find no target and its failure would leave nothing."""
    target = tmp_path / "t"
    _write(target, "old")
    os.replace(target, tmp_path / ".t.old")  # as a kill between the renames leaves it

    def fails(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_directory(target, fails, temp_prefix=".t.tmp-", aside_name=".t.old")
    assert _names(tmp_path) == ["t"] and (target / "f").read_text() == "old"


def test_recovery_keeps_a_complete_new_directory_and_replaces_an_incomplete_one(tmp_path):
    def complete(path: Path) -> bool:
        return (path / "DONE").is_file()

    target, aside = tmp_path / "t", tmp_path / ".t.old"
    for name in ("t", ".t.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "DONE").write_text(name)
    atomic.recover_directory(target, aside, complete)  # the new one arrived: the old copy goes
    assert _names(tmp_path) == ["t"] and (target / "DONE").read_text() == "t"

    (target / "DONE").unlink()  # a target that is not complete
    aside.mkdir()
    (aside / "DONE").write_text("old")
    atomic.recover_directory(target, aside, complete)
    assert _names(tmp_path) == ["t"] and (target / "DONE").read_text() == "old"


def test_every_file_is_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    target, synced = tmp_path / "t", []
    _write(target, "old")
    monkeypatch.setattr(atomic, "fsync_path", lambda path: synced.append((Path(path), (target / "a").exists())))

    def write(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "a").write_text("a")
        (folder / "sub" / "b").write_text("b")

    atomic.write_directory(target, write, temp_prefix=".t.tmp-", aside_name=".t.old")
    temp = tmp_path / f".t.tmp-{os.getpid()}"
    paths, renamed = [path for path, _ in synced], [done for _, done in synced]
    assert set(paths[:2]) == {temp / "a", temp / "sub" / "b"} and paths[2:] == [temp / "sub", temp, tmp_path]
    assert renamed == [False] * 4 + [True]  # the files and folders before the rename, the parent after it
