"""`torchrun -m clip_pacl_app index build` (2 gloo processes on CPU): the merged index is the single-process one, and a
failing rank (an error, a SIGKILL, ranks that disagree on the images or the weights) leaves the old index as it was."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_pacl
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import DataError
from clip_pacl.retrieval import ImageIndex
from clip_pacl.retrieval.ann import ANN_NAME
from clip_pacl.retrieval.sharded import _read_part, rank_block, shard_dir
from clip_pacl_app.cli.main import main
from helpers import require

# Runs `clip-pacl index ARGS` under torchrun with rank 1 made to fail in one way (argv[1]).
FAIL_SCRIPT = """
import os, signal, sys
import torch
import clip_pacl.checkpoint, clip_pacl.checkpoint.io, clip_pacl.retrieval.build, clip_pacl.retrieval.sharded
from clip_pacl_app.cli.main import main
mode = sys.argv[1]
# `clip-pacl index build` imports these when it runs (not at import: the CLI starts fast), so it gets the patched ones
if os.environ["RANK"] == "1":
    if mode == "raise":
        def embed(*args, **kwargs):
            raise PermissionError(13, "Permission denied", "/nodes/1/scratch")
        clip_pacl.retrieval.sharded.embed_files = embed
    elif mode == "die":
        def embed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        clip_pacl.retrieval.sharded.embed_files = embed
    elif mode == "listing":
        real_paths = clip_pacl.retrieval.build.image_paths
        clip_pacl.retrieval.build.image_paths = lambda *args, **kwargs: real_paths(*args, **kwargs)[:-1]
    elif mode == "weights":
        real_load = clip_pacl.checkpoint.io.load_with_source
        def load(*args, **kwargs):
            model, source = real_load(*args, **kwargs)
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
            return model, source
        clip_pacl.checkpoint.load_with_source = clip_pacl.checkpoint.io.load_with_source = load
sys.exit(main(["index", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """20 images listed in reverse order by a table with two more columns, two unreadable rows (one in each rank's
    block), one image listed twice; a saved tiny model; the single-process index of the table."""
    root = tmp_path_factory.mktemp("sharded")
    generate_synthetic(root / "data", n=20, seed=1, image_size=48)
    images = sorted((root / "data" / "images").glob("*.png"), reverse=True)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [(f"data/images/{p.name}", f"caption {i}", i % 3) for i, p in enumerate(images)]
    rows.insert(3, ("broken.png", "broken", 0))
    rows.insert(15, ("missing.png", "missing", 1))
    rows.append(rows[0][:1] + ("a second caption", 9))  # the image keeps its first row's columns
    with open(root / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption", "label"), *rows])
    torch.manual_seed(0)
    clip_pacl.save(clip_pacl.load("tiny"), root / "model")
    assert main(["index", "build", "--model", str(root / "model"), "--images", str(root / "table.csv"),
                 "--out", str(root / "single"), "--batch-size", "4", "--device", "cpu"]) == 0
    return root


def _torchrun(root: Path, out: Path, *target: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["build", "--model", str(root / "model"), "--images", str(root / "table.csv"), "--out", str(out),
            "--batch-size", "4", "--device", "cpu", "--json", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(300)
def test_two_ranks_build_the_single_process_index(setup, tmp_path):
    out = tmp_path / "idx"
    proc = _torchrun(setup, out, "-m", "clip_pacl_app", "index")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, merged = ImageIndex.load(setup / "single"), ImageIndex.load(out)
    assert merged.paths == single.paths and len(merged) == 20  # the table's order (not the folder's), once each
    assert merged.paths[0].endswith("000019.png")
    assert float((merged.embeddings - single.embeddings).abs().max()) <= 1e-6
    assert merged.stats == single.stats
    assert merged.metadata == single.metadata and merged.metadata[0] == {"caption": "caption 0", "label": "0"}
    assert (out / "paths.jsonl").read_bytes() == (setup / "single" / "paths.jsonl").read_bytes()
    assert {**merged.meta, "created": None} == {**single.meta, "created": None}  # the fingerprint and the rest
    assert merged.meta["unreadable"] == 2 and merged.meta["weights"].startswith("blake2b:")

    summary = json.loads(proc.stdout)  # rank 0 alone prints the result
    assert summary["count"] == 20 and summary["unreadable_per_rank"] == [1, 1]
    assert sorted(Path(u["path"]).name for u in summary["unreadable"]) == ["broken.png", "missing.png"]
    assert "rank 0/2: 11 inputs, 10 images embedded, 1 unreadable" in proc.stderr
    assert "rank 1/2: 11 inputs, 10 images embedded, 1 unreadable" in proc.stderr
    assert not shard_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.mark.timeout(300)
def test_two_ranks_build_the_approximate_index_after_the_merge(setup, tmp_path):
    """--faiss-index under torchrun: rank 0 alone builds IDX/ann.faiss over the merged rows, the one a single
    process builds (nprobe 2 of 4 lists, so the answers are approximate and come from it)."""
    require("faiss")
    ann_flags = ("--faiss-index", "IVF4,Flat", "--nprobe", "2")
    assert main(["index", "build", "--model", str(setup / "model"), "--images", str(setup / "table.csv"),
                 "--out", str(tmp_path / "single"), "--batch-size", "4", "--device", "cpu", *ann_flags]) == 0
    out = tmp_path / "idx"
    proc = _torchrun(setup, out, "-m", "clip_pacl_app", "index", extra=ann_flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("building the faiss index 'IVF4,Flat' over 20 embeddings") == 1  # rank 0 only
    single, merged = ImageIndex.load(tmp_path / "single"), ImageIndex.load(out)
    assert (out / ANN_NAME).is_file() and merged.ann is not None and merged.ann.ntotal == 20
    assert {**merged.meta["ann"], "build_seconds": 0} == {**single.meta["ann"], "build_seconds": 0}
    assert merged.uses_ann("auto") and merged.paths == single.paths
    own = merged.search(merged.embeddings, k=1)  # each merged row's nearest is itself: ann row i is row i
    assert [hits[0].path for hits in own] == merged.paths
    queries = torch.randn(12, merged.embed_dim, generator=torch.Generator().manual_seed(5))
    got, expected = merged.search(queries, k=5), single.search(queries, k=5)
    assert [[h.path for h in r] for r in got] == [[h.path for h in r] for r in expected]
    assert [h.score for r in got for h in r] == pytest.approx([h.score for r in expected for h in r], abs=1e-5)


@pytest.mark.timeout(300)
def test_two_ranks_build_int8_with_an_approximate_index_and_update_keeps_both(setup, tmp_path):
    """--int8 under torchrun: each rank encodes with its own int8 copy, quantized the same way (batches of one
    image, whose int8 embeddings depend on that image alone, so the rows equal a single process's int8 build); the
    merged meta.json records "quantize" and the float32 fingerprint; `index update` re-embeds in int8, re-reads the
    table's columns and builds the faiss index again."""
    require("faiss")
    flags = ("--int8", "--faiss-index", "IVF4,Flat", "--nprobe", "2")
    out = tmp_path / "idx"
    proc = _torchrun(setup, out, "-m", "clip_pacl_app", "index", extra=(*flags, "--batch-size", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["index", "build", "--model", str(setup / "model"), "--images", str(setup / "table.csv"),
                 "--out", str(tmp_path / "single"), "--batch-size", "1", "--device", "cpu", *flags]) == 0
    fp32, single, merged = (ImageIndex.load(p) for p in (setup / "single", tmp_path / "single", out))
    assert merged.meta["quantize"] == single.meta["quantize"] == "int8" and fp32.meta["quantize"] is None
    assert merged.meta["weights"] == fp32.meta["weights"]  # the float32 weights' fingerprint
    assert merged.paths == single.paths == fp32.paths
    assert float((merged.embeddings - single.embeddings).abs().max()) <= 1e-6
    assert 1e-5 < float((merged.embeddings - fp32.embeddings).abs().max()) < 0.1  # int8 ran, close to float32
    assert merged.ann is not None and merged.meta["ann"]["factory"] == "IVF4,Flat"

    with open(setup / "table.csv", newline="") as f:
        rows = list(csv.reader(f))
    changed = Path(merged.paths[0])
    rows[1][1] = "a new caption"  # the table's columns are read again
    table = setup / "table-updated.csv"  # beside the images its rows name
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    meta = json.loads((out / "meta.json").read_text())
    meta["images"]["source"] = str(table)
    (out / "meta.json").write_text(json.dumps(meta))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # re-embedded
    try:
        assert main(["index", "update", str(out), "--batch-size", "1", "--model", str(setup / "model")]) == 0
    finally:
        os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns - 10**9))
        table.unlink()
    updated = ImageIndex.load(out)
    assert updated.meta["quantize"] == "int8" and updated.meta["reused"] == 19
    assert float((updated.embeddings - merged.embeddings).abs().max()) <= 1e-6  # int8 again, not float32
    assert updated.metadata[0]["caption"] == "a new caption"
    assert updated.ann is not None and updated.meta["ann"]["factory"] == "IVF4,Flat"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode, message", [
    ("raise", "rank 1 of 2 failed"),
    ("die", None),
    ("listing", "the 2 ranks list different images"),
    ("weights", "the ranks loaded different weights"),
])
def test_a_failing_rank_leaves_the_old_index(setup, tmp_path, mode, message):
    out = tmp_path / "idx"
    shutil.copytree(setup / "single", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "fail.py").write_text(FAIL_SCRIPT)
    proc = _torchrun(setup, out, str(tmp_path / "fail.py"), mode)
    assert proc.returncode != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    if message is not None:
        assert f"error: {message}" in proc.stderr, proc.stderr[-3000:]
        assert not shard_dir(out).exists()  # a failure all ranks saw: the blocks written are removed
    if mode == "raise":
        assert "error: Permission denied: /nodes/1/scratch" in proc.stderr  # the failing rank's own error


@pytest.mark.parametrize("n, world", [(0, 2), (1, 3), (7, 2), (20, 3), (5, 5)])
def test_rank_blocks_cover_the_inputs_in_order(n, world):
    blocks = [list(range(n))[rank_block(n, rank, world)] for rank in range(world)]
    assert [i for block in blocks for i in block] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_a_missing_block_names_the_shared_filesystem(tmp_path):
    with pytest.raises(DataError, match="rank 3's block .* filesystem every node sees"):
        _read_part(tmp_path, 3)
