"""Image index: build (folders, tables, broken files), save/load, exact search by text and image, the CLI."""

import csv
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_pacl
import clip_pacl.retrieval.backends as backends
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import CheckpointError, DataError, MissingDependencyError
from clip_pacl.retrieval import ImageIndex, build_index, image_paths
from clip_pacl.retrieval.search import load_index_model, search_image, search_text
from clip_pacl.tokenizer import tokenize
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder of 8 images (two in a subfolder), a broken image and a non-image file; a saved tiny model."""
    root = tmp_path_factory.mktemp("index")
    generate_synthetic(root / "data", n=8, seed=3, image_size=64)
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((root / "data" / "images").glob("*.png"))):
        shutil.copy(src, photos / ("sub" if i >= 6 else "") / src.name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (photos / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    clip_pacl.save(model, root / "model")
    return root, photos, model


def test_build_save_load(setup, tmp_path):
    root, photos, model = setup
    paths = image_paths(photos)
    assert len(paths) == 9 and all(p.is_absolute() for p in paths)  # 8 images + broken.jpg; notes.txt ignored
    index, unreadable = build_index(model, paths, batch_size=4, model_source=str(root / "model"), progress=False)
    assert len(index) == 8 and [p for p, _ in unreadable] == [str(photos / "broken.jpg")]
    assert index.embeddings.dtype == torch.float32
    torch.testing.assert_close(index.embeddings.norm(dim=-1), torch.ones(8))

    index.save(tmp_path / "idx")
    assert np.load(tmp_path / "idx" / "embeddings.npy").dtype == np.float32
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["count"] == 8 and meta["embed_dim"] == model.embed_dim and meta["unreadable"] == 1
    assert meta["model"] == str((root / "model").resolve()) and meta["model_has_weights"] and meta["created"]
    loaded = ImageIndex.load(tmp_path / "idx")
    assert loaded.paths == index.paths
    torch.testing.assert_close(loaded.embeddings, index.embeddings)


def test_search_is_exact_and_backends_agree(setup):
    root, photos, model = setup
    index, _ = build_index(model, image_paths(photos), model_source=str(root / "model"), progress=False)
    query = sorted(photos.glob("*.png"))[2]
    hits = search_image(index, model, query, k=3)
    assert hits[0].path == str(query) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score

    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenize(["a red circle", "a blue square"])), dim=-1)  # (2, D)
    expected = (text @ index.embeddings.T).argsort(dim=1, descending=True)  # (2, N)
    results = search_text(index, model, ["a red circle", "a blue square"], k=100)
    for q, hits in enumerate(results):
        assert len(hits) == 8  # k is capped at the index size
        assert [h.path for h in hits] == [index.paths[i] for i in expected[q].tolist()]
    faiss_results = search_text(index, model, ["a red circle", "a blue square"], k=5, backend="faiss")
    for torch_hits, faiss_hits in zip(results, faiss_results):
        assert [h.path for h in faiss_hits] == [h.path for h in torch_hits[:5]]
        assert [h.score for h in faiss_hits] == pytest.approx([h.score for h in torch_hits[:5]], abs=1e-5)


def test_faiss_is_optional(monkeypatch):
    g = torch.Generator().manual_seed(0)
    index = ImageIndex(F.normalize(torch.randn(20, 8, generator=g), dim=-1), [f"/img/{i}.png" for i in range(20)])
    queries = torch.randn(3, 8, generator=g)
    exact = index.search(queries, k=4, backend="torch")
    monkeypatch.setattr(backends, "FAISS_AUTO_THRESHOLD", 10)  # "large": auto picks faiss when installed
    with_faiss = index.search(queries, k=4)
    assert isinstance(index._faiss_flat, backends.FaissFlatSearch)  # the auto search built and kept it
    for a, b in zip(with_faiss, exact):
        assert [h.path for h in a] == [h.path for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-6)
    index._faiss_flat = None
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if clip-pacl[faiss] were not installed
    assert index.search(queries, k=4) == exact  # auto falls back to exact torch search
    with pytest.raises(MissingDependencyError, match=r"clip-pacl\[faiss\]"):
        index.search(queries, k=4, backend="faiss")


def test_index_from_table_and_errors(setup, tmp_path):
    root, photos, model = setup
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for p in sorted(photos.glob("*.png"))[:3]:
            writer.writerow([p, "x"])
            writer.writerow([p, "y"])  # repeated images are indexed once
    assert len(image_paths(tmp_path / "list.csv", image_key="file")) == 3
    with pytest.raises(DataError, match="no column 'image'"):
        image_paths(tmp_path / "list.csv")
    with pytest.raises(DataError, match="does not exist"):
        image_paths(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        image_paths(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="is not an image index"):
        ImageIndex.load(tmp_path / "empty")

    index, _ = build_index(model, image_paths(photos), model_source="tiny", progress=False)
    assert not index.meta["model_has_weights"]
    with pytest.raises(DataError, match="randomly initialised"):
        load_index_model(index)
    other = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32,
                                             "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(DataError, match="dimensions"):
        load_index_model(index, str(tmp_path / "other.json"))  # a 64-d model for a 128-d index


def test_cli_build_and_search(setup, tmp_path, capsys):
    root, photos, _ = setup
    idx = tmp_path / "idx"
    assert main(["index", "build", "--model", str(root / "model"), "--images", str(photos), "--out", str(idx),
                 "--batch-size", "3", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["count"] == 8 and len(built["unreadable"]) == 1

    query = sorted(photos.glob("*.png"))[0]
    assert main(["search", str(idx), "--image", str(query), "-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 4 and out["results"][0]["path"] == str(query)

    assert main(["search", str(idx), "a green triangle", "-k", "2", "--faiss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1" and lines[0].split()[2].startswith(str(photos))


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "{idx}", "a cat", "--image", "{img}"], "exactly one"),
        (["search", "{idx}"], "exactly one"),
        (["search", "{tmp}/nothing", "a cat"], "is not an image index"),
        (["search", "{idx}", "--image", "{tmp}/missing.png"], "does not exist"),
        (["search", "{idx}", "a cat", "-k", "0"], "-k must be at least 1"),
        (["index", "build", "--model", "{model}", "--images", "{tmp}/none", "--out", "{tmp}/o"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(setup, tmp_path, capsys, args, message):
    root, photos, model = setup
    idx = tmp_path / "idx"
    index, _ = build_index(model, image_paths(photos), model_source=str(root / "model"), progress=False)
    index.save(idx)
    values = {"idx": idx, "img": sorted(photos.glob("*.png"))[0], "tmp": tmp_path, "model": root / "model"}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
