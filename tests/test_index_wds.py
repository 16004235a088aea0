"""Webdataset shards as index input: samples named SHARD#KEY in shard and tar order, their txt/json as metadata,
unreadable samples counted, the sharded (torchrun) build equal to one process, thumbnails, update, search by shard."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_pacl
from clip_pacl.errors import DataError
from clip_pacl.preprocess import model_transform
from clip_pacl.retrieval import ImageIndex
from clip_pacl.retrieval.search import search_text
from clip_pacl.retrieval.sharded import index_from_parts
from clip_pacl.retrieval.wds_images import embed_shards, read_sample_image, wds_shards
from clip_pacl_app.cli.main import main

SIZES = (7, 4, 5)
BROKEN = (1, 2)  # shard 1's sample 2 has a .jpg that is not an image


def _colour(shard: int, i: int) -> tuple[int, int, int]:
    return (i * 30 % 256, 80 * shard, 120 + 10 * i)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(SIZES):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(n):
                key = f"s{s}_{i:03d}"
                buf = io.BytesIO()
                Image.new("RGB", (40, 40), _colour(s, i)).save(buf, format="PNG")
                if (s, i) == BROKEN:
                    _add(tar, key + ".jpg", b"\xff\xd8\xff not a jpeg")
                else:
                    _add(tar, key + ".png", buf.getvalue())
                _add(tar, key + ".txt", f"sample {i} of shard {s}".encode())
                _add(tar, key + ".json", json.dumps({"n": i, "tags": ["x"]}).encode())
            _add(tar, f"s{s}_zzz.txt", b"a caption without an image")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    _write_shards(root / "shards")
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    clip_pacl.save(model, root / "model")
    pattern = str(root / "shards" / "shard-{000000..000002}.tar")
    assert main(["index", "build", "--model", str(root / "model"), "--images", pattern, "--out", str(root / "idx"),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    return root, model


def test_samples_are_indexed_in_order_with_their_metadata(setup):
    root, model = setup
    index = ImageIndex.load(root / "idx")
    shards = [str(root / "shards" / f"shard-{s:06d}.tar") for s in range(3)]
    expected = [(s, i) for s, n in enumerate(SIZES) for i in range(n) if (s, i) != BROKEN]
    assert index.paths == [f"{shards[s]}#s{s}_{i:03d}" for s, i in expected]
    assert index.metadata == [{"caption": f"sample {i} of shard {s}", "n": i, "tags": ["x"]} for s, i in expected]
    assert index.stats[0] == {"size": os.stat(shards[0]).st_size, "mtime_ns": os.stat(shards[0]).st_mtime_ns}
    assert index.meta["images"] == {"source": str(root / "shards" / "shard-{000000..000002}.tar"), "format": "wds"}
    assert index.meta["unreadable"] == 4  # the broken jpg and three samples with no image

    transform = model_transform(model)
    pixels = torch.stack([transform(Image.new("RGB", (40, 40), _colour(s, i))) for s, i in expected])
    with torch.no_grad():
        direct = model.encode_image(pixels, normalize=True)  # (15, D)
    torch.testing.assert_close(index.embeddings, direct, atol=1e-5, rtol=0)

    hits = search_text(index, model, "sample", k=20, prefix=shards[1] + "#")[0]
    assert sorted(h.path for h in hits) == [f"{shards[1]}#s1_{i:03d}" for i in (0, 1, 3)]
    assert all(h.metadata["caption"].endswith("of shard 1") for h in hits)


def test_unreadable_samples_and_a_damaged_tar_are_counted(setup, tmp_path):
    root, model = setup
    part = embed_shards(model, [str(root / "shards" / "shard-000001.tar")], batch_size=2, progress=False)
    assert len(part.paths) == 3 and [Path(p).name for p, _ in part.unreadable] == [
        "shard-000001.tar#s1_002", "shard-000001.tar#s1_zzz"]
    assert "s1_002.jpg" in part.unreadable[0][1] and "no image member" in part.unreadable[1][1]

    shard = root / "shards" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmember("s0_004.png").offset_data + 10
    (tmp_path / "cut.tar").write_bytes(shard.read_bytes()[:offset])  # a copy cut short inside sample 4's png
    cut = embed_shards(model, [str(tmp_path / "cut.tar")], progress=False)
    assert cut.paths == [f"{tmp_path / 'cut.tar'}#s0_{i:03d}" for i in range(4)]
    assert cut.unreadable[-1][0] == str(tmp_path / "cut.tar")
    assert "damaged tar" in cut.unreadable[-1][1]

    shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    with_workers = embed_shards(model, shards, batch_size=2, workers=2, progress=False)  # interleaved batches
    assert with_workers.paths == ImageIndex.load(root / "idx").paths and len(with_workers.unreadable) == 4

    empty = embed_shards(model, [], progress=False)
    assert len(empty.paths) == 0 and empty.embeddings.shape == (0, model.embed_dim)
    merged = index_from_parts(model, [empty, part], 1).index  # a rank with no shard adds nothing
    assert merged.paths == part.paths and merged.metadata == part.metadata


def test_which_inputs_are_shards(setup, tmp_path):
    root, _ = setup
    shards = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    assert wds_shards(root / "shards") == shards  # a folder of .tar files and no images
    assert wds_shards(str(root / "shards" / "shard-{000000..000002}.tar")) == shards
    assert wds_shards(root / "shards" / "shard-000001.tar") == shards[1:2]
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.png")
    assert wds_shards(tmp_path / "photos") is None and wds_shards(tmp_path / "table.csv") is None
    with pytest.raises(DataError, match="local webdataset shards only"):
        wds_shards("https://example.com/shard-{000..009}.tar")
    with pytest.raises(DataError, match="shards do not exist"):
        wds_shards(str(root / "shards" / "shard-{000000..000005}.tar"))


def test_thumbnails_read_the_sample_back(setup):
    from clip_pacl_app.web.service import WebService

    root, model = setup
    index = ImageIndex.load(root / "idx")
    service = WebService(model, index)
    thumb = np.asarray(Image.open(io.BytesIO(service.thumbnail(9))).convert("RGB"), dtype=np.float32)
    s, i = 1, 3  # row 9: shard 0's 7 samples, s1_000, s1_001, then (s1_002 is broken) s1_003
    assert index.paths[9].endswith(f"#s{s}_{i:03d}")
    assert np.abs(thumb - np.array(_colour(s, i), dtype=np.float32)).max() < 4  # JPEG of a plain colour
    assert np.asarray(read_sample_image(index.paths[9])).reshape(-1, 3)[0].tolist() == list(_colour(s, i))
    with pytest.raises(DataError, match="has no image for sample s1_zzz"):
        read_sample_image(index.paths[9].replace("s1_003", "s1_zzz"))
    with pytest.raises(DataError, match="s1_002.jpg is not an image"):
        read_sample_image(index.paths[9].replace("s1_003", "s1_002"))


def test_update_embeds_the_shards_again(setup, tmp_path, capsys):
    root, _ = setup
    _write_shards(tmp_path / "shards")
    assert main(["index", "build", "--model", str(root / "model"), "--images", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "idx")]) == 0
    with tarfile.open(tmp_path / "shards" / "shard-000003.tar", "w") as tar:
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="PNG")
        _add(tar, "new.png", buf.getvalue())
        _add(tar, "new.txt", b"a new sample")
    capsys.readouterr()
    assert main(["index", "update", str(tmp_path / "idx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 16 and summary["embedded"] == 16 and summary["reused"] == 0
    updated = ImageIndex.load(tmp_path / "idx")
    assert updated.paths[-1] == str(tmp_path / "shards" / "shard-000003.tar") + "#new"
    assert updated.metadata[-1] == {"caption": "a new sample"}


@pytest.mark.timeout(300)
def test_two_ranks_split_the_shards_and_build_the_single_process_index(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "clip_pacl_app", "index", "build", "--model", str(root / "model"), "--images",
           str(root / "shards" / "shard-{000000..000002}.tar"), "--out", str(out), "--batch-size", "3",
           "--device", "cpu", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, merged = ImageIndex.load(root / "idx"), ImageIndex.load(out)
    assert (out / "paths.jsonl").read_bytes() == (root / "idx" / "paths.jsonl").read_bytes()
    assert float((merged.embeddings - single.embeddings).abs().max()) <= 1e-6
    assert {**merged.meta, "created": None} == {**single.meta, "created": None}
    assert json.loads(proc.stdout)["unreadable_per_rank"] == [1, 3]  # rank 0: shard 0; rank 1: shards 1 and 2
    assert "rank 1/2: 2 inputs, 8 images embedded, 3 unreadable" in proc.stderr
