"""The index on disk: a killed build leaves the old index or the new one; queries must use the weights and
preprocessing that built it; `index update` equals a fresh build; damaged files are one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_pacl
from clip_pacl.errors import CheckpointError, DataError
from clip_pacl.retrieval.build import build_index, check_model, image_paths
from clip_pacl.retrieval.store import ImageIndex
from clip_pacl_app.cli.main import main

# Runs `clip-pacl ARGS` with one step of ImageIndex.save (`clip_pacl.atomic.write_directory`) made to stop (it
# writes `marker` and sleeps there), so that the test can SIGKILL the build at that exact moment: "writing" (only
# embeddings.npy in the temporary directory), "written" (every file fsynced, not the directory), "swapping" (the
# old index set aside, the new one not renamed in), "cleaning" (the new one in place, the old one not removed).
KILL_SCRIPT = """
import os, shutil, sys, time
from pathlib import Path
import numpy as np
import clip_pacl.atomic as atomic
from clip_pacl_app.cli.main import main
moment, marker = sys.argv[1], Path(sys.argv[2])
calls = {"fsync": 0, "replace": 0, "rmtree": 0}
def pause():
    marker.write_text(moment)
    time.sleep(120)
def wrap(name, target, when):
    def wrapped(*args, **kwargs):
        calls[name] += 1
        if when(*args):
            pause()
        return target(*args, **kwargs)
    return wrapped
real_save = np.save
def save_then_pause(*args, **kwargs):
    real_save(*args, **kwargs)
    if moment == "writing":
        pause()
np.save = save_then_pause
atomic.fsync_path = wrap("fsync", atomic.fsync_path, lambda path: moment == "written" and ".tmp-" in Path(path).name)
os.replace = wrap("replace", os.replace, lambda *a: moment == "swapping" and calls["replace"] == 2)
shutil.rmtree = wrap("rmtree", shutil.rmtree, lambda *a: moment == "cleaning" and calls["replace"] == 2)
sys.exit(main(sys.argv[3:]))
"""


def _images(folder: Path, colours: list[tuple[int, int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    torch.manual_seed(0)
    clip_pacl.save(clip_pacl.load("tiny"), root / "model")
    torch.manual_seed(1)
    clip_pacl.save(clip_pacl.load("tiny"), root / "other")  # same architecture, other weights
    old = _images(root / "old", [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9)])
    new = _images(root / "new", [(250, 250, 0), (0, 250, 250), (250, 0, 250), (90, 90, 90), (5, 5, 5), (50, 0, 9)])
    return {"root": root, "model": root / "model", "other": root / "other", "old": old, "new": new}


def _build(setup, images: Path, out: Path) -> list[str]:
    return ["index", "build", "--model", str(setup["model"]), "--images", str(images), "--out", str(out)]


@pytest.mark.parametrize("moment, survivor", [("writing", "old"), ("written", "old"), ("swapping", "old"),
                                              ("cleaning", "new")])
def test_a_killed_build_leaves_the_old_or_the_new_index(setup, tmp_path, capsys, moment, survivor):
    idx = tmp_path / "idx"
    assert main(_build(setup, setup["old"], idx)) == 0
    capsys.readouterr()
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, moment, str(marker), *_build(setup, setup["new"], idx)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the build never reached the moment"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()

    expected = {str(p.resolve()) for p in setup[survivor].glob("*.png")}
    assert set(ImageIndex.load(idx).paths) == expected
    assert main(["search", str(idx), "a red square", "-k", "10", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert {r["path"] for r in results} == expected
    # the next build clears what the killed one left, and replaces the index whole
    assert main(_build(setup, setup["new"], idx)) == 0
    assert set(ImageIndex.load(idx).paths) == {str(p.resolve()) for p in setup["new"].glob("*.png")}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_build_refuses_to_replace_a_folder_that_is_not_an_index(setup, tmp_path, capsys, monkeypatch):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")

    def never(*args, **kwargs):
        raise AssertionError("images were encoded before --out was checked")

    monkeypatch.setattr("clip_pacl.retrieval.build.build_index", never)  # the refusal comes before any encoding
    assert main(_build(setup, setup["old"], tmp_path / "photos")) == 2
    assert "is not an image index" in capsys.readouterr().err
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"


def test_queries_with_other_weights_are_refused_unless_forced(setup, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(_build(setup, setup["old"], idx)) == 0
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["weights"].startswith("blake2b:") and meta["preprocessing"]["image_size"] == 64
    capsys.readouterr()
    assert main(["search", str(idx), "red", "--model", str(setup["other"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the index was built with other weights") and "--force" in err
    assert err.count("\n") == 1
    assert main(["search", str(idx), "red", "--model", str(setup["other"]), "--force"]) == 0
    assert main(["search", str(idx), "red", "--model", str(setup["model"])]) == 0  # the same weights, reloaded
    index, model = ImageIndex.load(idx), clip_pacl.load(setup["model"])
    index.meta["preprocessing"] = {**index.meta["preprocessing"], "image_size": 224}
    with pytest.raises(DataError, match="other preprocessing"):
        check_model(index, model)


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def test_update_embeds_only_what_changed_and_equals_a_fresh_build(setup, tmp_path, capsys):
    photos = _images(tmp_path / "photos", [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9), (99, 9, 9)])
    (photos / "notes.txt").write_text("not an image")
    idx = tmp_path / "idx"
    assert main(_build(setup, photos, idx)) == 0
    capsys.readouterr()
    (photos / "1.png").unlink()  # deleted
    Image.new("RGB", (40, 40), (0, 0, 0)).save(photos / "2.png")  # changed (and its mtime moves on)
    _touch_later(photos / "2.png")
    _images(photos / "sub", [(1, 200, 100)])  # added
    assert main(["index", "update", str(idx), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["count"], summary["embedded"], summary["reused"], summary["dropped"]) == (5, 2, 3, 1)
    updated = ImageIndex.load(idx)
    fresh, _ = build_index(clip_pacl.load(setup["model"]), image_paths(photos), progress=False)
    assert updated.paths == fresh.paths
    torch.testing.assert_close(updated.embeddings, fresh.embeddings, atol=1e-5, rtol=0)
    assert updated.stats == fresh.stats
    assert main(["index", "update", str(idx), "--json"]) == 0  # nothing changed: nothing embedded
    assert json.loads(capsys.readouterr().out)["embedded"] == 0
    assert main(["index", "update", str(idx), "--model", str(setup["other"])]) == 2  # other weights
    assert "other weights" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("empty_embeddings", "damaged image index"),
    ("truncated_embeddings", "damaged image index"),
    ("count", "meta.json says count 4, the files hold 3"),
    ("dim", "meta.json says embed_dim"),
    ("rows", "holds (4, "),
    ("meta_not_json", "damaged image index"),
])
def test_damaged_indexes_are_one_line_errors(setup, tmp_path, capsys, damage, message):
    idx = tmp_path / "idx"
    assert main(_build(setup, setup["old"], idx)) == 0
    capsys.readouterr()
    embeddings, meta_path = idx / "embeddings.npy", idx / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "empty_embeddings":
        embeddings.write_bytes(b"")
    elif damage == "truncated_embeddings":
        embeddings.write_bytes(embeddings.read_bytes()[:200])
    elif damage == "count":
        lines = (idx / "paths.jsonl").read_text().splitlines()
        (idx / "paths.jsonl").write_text("\n".join(lines[:3]) + "\n")
        np.save(embeddings, np.load(embeddings)[:3])
        meta_path.write_text(json.dumps({**meta, "count": 4}))
    elif damage == "dim":
        meta_path.write_text(json.dumps({**meta, "embed_dim": 7}))
    elif damage == "rows":
        lines = (idx / "paths.jsonl").read_text().splitlines()
        (idx / "paths.jsonl").write_text("\n".join(lines[:2]) + "\n")
    else:
        meta_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        ImageIndex.load(idx)
    for argv in (["search", str(idx), "red"], ["serve", "--index", str(idx)], ["index", "update", str(idx)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "damaged" in err, (argv, err)
