"""Approximate search with faiss: factory strings build, query settings act, the file round-trips, `index update`
keeps it consistent, `auto` stays exact for small sets, and every mistake is one line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_pacl
import clip_pacl.retrieval.ann as ann_module
from clip_pacl.errors import CheckpointError, DataError, MissingDependencyError
from clip_pacl.retrieval import ImageIndex
from clip_pacl.retrieval.ann import ANN_NAME
from clip_pacl.retrieval.search import search_text
from clip_pacl_app.cli.main import main
from clip_pacl_app.web.service import WebService
from helpers import require

faiss = require("faiss")


def _index(n: int = 400, dim: int = 16, seed: int = 0) -> ImageIndex:
    g = torch.Generator().manual_seed(seed)
    return ImageIndex(F.normalize(torch.randn(n, dim, generator=g), dim=-1), [f"/img/{i}.png" for i in range(n)])


def _queries(n: int = 20, dim: int = 16) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(99))


def _recall(got: list, exact: list) -> float:
    return sum(len({h.path for h in a} & {h.path for h in b}) for a, b in zip(got, exact)) / sum(map(len, exact))


def test_ivf_probing_every_list_is_exact_and_nprobe_trades_recall():
    index, queries = _index(), _queries()
    exact = index.search(queries, k=10, backend="torch")
    index.build_ann("IVF4,Flat", nprobe=4)
    assert index.ann is not None and index.meta["ann"]["nprobe"] == 4
    full = index.search(queries, k=10)  # auto: the approximate index, at its saved nprobe (every list)
    assert [[h.path for h in r] for r in full] == [[h.path for h in r] for r in exact]
    for a, b in zip(full, exact):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
    recalls = [_recall(index.search(queries, k=10, nprobe=n), exact) for n in (1, 2, 4)]
    assert recalls[0] < recalls[1] < recalls[2] == 1.0
    assert _recall(index.search(queries, k=10), exact) == 1.0  # a query's nprobe does not stick


def test_hnsw_finds_each_stored_vector_and_ef_search_is_saved():
    index = _index(300)
    index.build_ann("HNSW32", ef_search=64)
    assert index.meta["ann"]["ef_search"] == 64 and index.meta["ann"]["train_size"] == 0  # HNSW needs no training
    hits = index.search(index.embeddings, k=1, backend="ann")
    assert [h[0].path for h in hits] == index.paths  # each stored vector's nearest is itself
    assert all(h[0].score == pytest.approx(1.0, abs=1e-5) for h in hits)


def test_pq_candidates_are_reranked_exactly():
    index, queries = _index(2000, 32), _queries(dim=32)
    exact = index.search(queries, k=10, backend="torch")
    index.build_ann("PQ8x4fs")  # 4 dims per 4-bit code: coarse
    assert index.meta["ann"]["rerank"] == 1
    coarse, reranked = index.search(queries, k=10), index.search(queries, k=10, rerank=50)
    assert _recall(coarse, exact) < _recall(reranked, exact) and _recall(reranked, exact) >= 0.9
    by_path = {h.path: h.score for r in index.search(queries[:1], k=2000, backend="torch") for h in r}
    assert [h.score for h in coarse[0]] == pytest.approx([by_path[h.path] for h in coarse[0]], abs=1e-5)  # true cosines
    assert [h.score for h in coarse[0]] == sorted((h.score for h in coarse[0]), reverse=True)


def test_kmeans_warnings_of_a_small_pq_build_come_as_one_line(capfd):
    """faiss warns once per sub-quantizer it trains on too few points (here 8 of them, 300 points for 16 centroids
    where it asks for 624): the build says it in one line."""
    index = _index(300, 32)
    index.build_ann("PQ8x4fs")
    err = capfd.readouterr().err
    assert "WARNING clustering" not in err, err
    notes = [line for line in err.splitlines() if "k-means warned" in line]
    assert notes == ["note: faiss's k-means warned 8 times that it had few training points (clustering 300 points "
                     "to 16 centroids: please provide at least 624 training points); the index works, with "
                     "codebooks fitted to fewer points than faiss recommends"], err


def test_training_uses_a_seeded_sample_of_the_requested_size():
    index = _index(2000)
    index.build_ann("IVF8,Flat", train_size=500)
    first = faiss.serialize_index(index.ann.index)
    assert index.meta["ann"]["train_size"] == 500 and index.meta["ann"]["options"]["train_size"] == 500
    index.build_ann("IVF8,Flat", train_size=500)
    assert np.array_equal(faiss.serialize_index(index.ann.index), first)  # the same sample, the same lists
    index.build_ann("IVF8,Flat", train_size=1000)
    assert not np.array_equal(faiss.serialize_index(index.ann.index), first)
    index.build_ann("IVF8,Flat")
    assert index.meta["ann"]["train_size"] == 2000  # default: every embedding, up to MIN_TRAIN_SIZE


def test_few_probed_lists_give_fewer_results_not_padding():
    index, queries = _index(400), _queries(5)
    index.build_ann("IVF64,Flat", nprobe=1)
    hits = index.search(queries, k=100)
    assert all(0 < len(h) < 100 for h in hits) and all(h.path.startswith("/img/") for r in hits for h in r)
    scores, rows = index.ann.search(F.normalize(queries, dim=-1), 100, index.embeddings, rerank=4)
    for row_scores, row_ids in zip(scores, rows):
        found = int((row_ids >= 0).sum())
        assert (row_ids[:found] >= 0).all() and (row_ids[found:] == -1).all()  # the padding comes last
        assert np.isneginf(row_scores[found:]).all() and np.isfinite(row_scores[:found]).all()
        assert list(row_scores[:found]) == sorted(row_scores[:found], reverse=True)


def test_the_file_round_trips_and_is_faiss_format(tmp_path):
    index, queries = _index(), _queries()
    index.build_ann("IVF4,Flat", nprobe=2)
    before = index.search(queries, k=5)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["ann"]["file"] == ANN_NAME and meta["ann"]["factory"] == "IVF4,Flat" and meta["ann"]["nprobe"] == 2
    assert meta["ann"]["faiss_version"] == faiss.__version__ and meta["ann"]["train_size"] == 400
    assert (tmp_path / "idx" / ANN_NAME).read_bytes()[:4] == b"IwFl"  # faiss's own IndexIVFFlat header, no pickle
    assert faiss.read_index(str(tmp_path / "idx" / ANN_NAME)).ntotal == 400
    loaded = ImageIndex.load(tmp_path / "idx")
    assert loaded.ann is not None and loaded.search(queries, k=5) == before
    loaded.save(tmp_path / "idx")  # saving over an index with an ann.faiss is allowed, and keeps it
    assert ImageIndex.load(tmp_path / "idx").search(queries, k=5) == before


@pytest.mark.parametrize("damage", ["truncated", "missing", "other_index", "meta_not_object"])
def test_a_damaged_ann_file_is_a_one_line_error(tmp_path, damage):
    index = _index()
    index.build_ann("IVF4,Flat")
    index.save(tmp_path / "idx")
    path = tmp_path / "idx" / ANN_NAME
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "missing":
        path.unlink()
    elif damage == "meta_not_object":
        meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
        (tmp_path / "idx" / "meta.json").write_text(json.dumps({**meta, "ann": "IVF4,Flat"}))
    else:
        other = _index(50)
        other.build_ann("IVF4,Flat")
        faiss.write_index(other.ann.index, str(path))
    with pytest.raises(CheckpointError, match="damaged image index") as info:
        ImageIndex.load(tmp_path / "idx")
    assert "\n" not in str(info.value)


def test_an_index_whose_ann_no_longer_matches_is_not_saved(tmp_path):
    index = _index()
    index.build_ann("IVF4,Flat")
    smaller = ImageIndex(index.embeddings[:10], index.paths[:10], index.meta, ann=index.ann)
    with pytest.raises(DataError, match="does not match its embeddings"):
        smaller.save(tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_auto_is_exact_for_small_sets_and_pq_for_large(monkeypatch):
    index = _index(400, 64)
    index.build_ann("auto")
    assert index.ann is None and index.meta["ann"]["factory"] is None and index.meta["ann"]["requested"] == "auto"
    monkeypatch.setattr(ann_module, "AUTO_MIN_VECTORS", 300)
    index.build_ann("auto")
    assert index.meta["ann"]["factory"] == "PQ32x4fs" and index.meta["ann"]["rerank"] == ann_module.AUTO_RERANK
    queries = _queries(dim=64)
    assert _recall(index.search(queries, k=10), index.search(queries, k=10, backend="torch")) >= 0.95


def test_without_faiss_search_is_exact_and_ann_requests_fail(tmp_path, monkeypatch):
    index, queries = _index(), _queries()
    index.build_ann("IVF4,Flat", nprobe=1)
    index.save(tmp_path / "idx")
    exact = index.search(queries, k=5, backend="torch")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if clip-pacl[faiss] were not installed
    loaded = ImageIndex.load(tmp_path / "idx")
    assert loaded.ann is None and loaded.search(queries, k=5) == exact
    for kwargs in ({"backend": "ann"}, {"nprobe": 2}):
        with pytest.raises(MissingDependencyError, match=r"clip-pacl\[faiss\]"):
            loaded.search(queries, k=5, **kwargs)
    with pytest.raises(MissingDependencyError, match=r"--faiss-index needs 'faiss-cpu'"):
        _index().build_ann("HNSW32")


@pytest.mark.parametrize("factory, options, message", [
    ("blah", {}, "'blah' is not a faiss index factory string"),
    ("IVF1024,Flat", {}, "cannot build the faiss index 'IVF1024,Flat' from 400 embeddings (Number of training points"),
    ("PQ5", {}, "should be a multiple of the number of subquantizers"),
    ("HNSW32", {"nprobe": 4}, "nprobe does not apply to the faiss index 'HNSW32' (it has no inverted lists)"),
    ("IVF4,Flat", {"ef_search": 4}, "ef_search does not apply"),
    ("IVF4,Flat", {"rerank": 0}, "rerank must be a positive integer, got 0"),
    (" ", {}, "factory string is empty"),
])
def test_build_mistakes_are_one_line(factory, options, message):
    with pytest.raises(DataError) as info:
        _index().build_ann(factory, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_query_setting_mistakes_are_one_line():
    index, queries = _index(), _queries()
    with pytest.raises(DataError, match="has no approximate faiss index"):
        index.search(queries, nprobe=2)
    with pytest.raises(DataError, match="has no approximate faiss index"):
        index.search(queries, backend="ann")
    index.build_ann("IVF4,Flat")
    with pytest.raises(ValueError, match="approximate search only, not to the 'torch' backend"):
        index.search(queries, backend="torch", nprobe=2)
    with pytest.raises(DataError, match="ef_search does not apply"):
        index.search(queries, ef_search=8)
    with pytest.raises(DataError, match="nprobe must be a positive integer"):
        index.search(queries, nprobe=0)


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ann")
    torch.manual_seed(0)
    clip_pacl.save(clip_pacl.load("tiny"), root / "model")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photos / f"{i:02d}.png")
    return root


def _build(setup, out, *flags, images=None) -> list[str]:
    return ["index", "build", "--model", str(setup / "model"), "--images", str(images or setup / "photos"),
            "--out", str(out), *flags]


def _search(idx, *flags, capsys) -> list[str]:
    assert main(["search", str(idx), "a photo", "-k", "5", "--json", *flags]) == 0
    return [r["path"] for r in json.loads(capsys.readouterr().out)["results"]]


def test_cli_build_search_and_update(setup, tmp_path, capsys):
    idx = tmp_path / "idx"
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted((setup / "photos").glob("*.png")):
        (photos / src.name).write_bytes(src.read_bytes())
    assert main(_build(setup, idx, "--faiss-index", "IVF3,Flat", "--nprobe", "3", "--json", images=photos)) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["ann"]["factory"] == "IVF3,Flat" and built["ann"]["nprobe"] == 3 and (idx / ANN_NAME).is_file()
    exact = _search(idx, "--exact", capsys=capsys)
    assert _search(idx, capsys=capsys) == exact  # every list probed
    assert _search(idx, "--nprobe", "1", capsys=capsys) != exact  # one list of three: other images come back

    Image.new("RGB", (40, 40), (0, 200, 0)).save(photos / "new.png")
    (photos / "00.png").unlink()
    assert main(["index", "update", str(idx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12
    updated = ImageIndex.load(idx)
    assert updated.ann.ntotal == 12 and updated.meta["ann"]["factory"] == "IVF3,Flat"
    assert updated.meta["ann"]["nprobe"] == 3
    assert _search(idx, capsys=capsys) == _search(idx, "--exact", capsys=capsys)  # the rebuilt index is in step


def test_cli_auto_stays_exact_for_a_small_collection(setup, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(_build(setup, idx, "--faiss-index", "auto")) == 0
    out = capsys.readouterr().out
    assert "'auto' chose exact search for 12 images" in out and not (idx / ANN_NAME).exists()
    assert json.loads((idx / "meta.json").read_text())["ann"]["factory"] is None


def test_serve_uses_the_approximate_index_with_its_settings(setup, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(_build(setup, idx, "--faiss-index", "HNSW16")) == 0
    capsys.readouterr()
    index = ImageIndex.load(idx)
    model = clip_pacl.load(setup / "model")
    service = WebService(model, index, search_settings={"ef_search": 32})
    assert [r["path"] for r in service.search_text("a photo", 5)] == [
        Path(p).name for p in _search(idx, "--exact", capsys=capsys)]  # HNSW on 12 images: exact
    with pytest.raises(DataError, match="nprobe does not apply"):
        WebService(model, index, search_settings={"nprobe": 2})


@pytest.fixture(scope="module")
def built(setup):
    """An index without an approximate index and one with an IVF2,Flat, both of the 12 images."""
    paths = {"plain": setup / "plain", "ivf": setup / "ivf"}
    assert main(_build(setup, paths["plain"])) == 0
    assert main(_build(setup, paths["ivf"], "--faiss-index", "IVF2,Flat")) == 0
    return paths


@pytest.mark.parametrize("args, message", [
    (["build", "--faiss-index", "blah"], "'blah' is not a faiss index factory string"),
    (["build", "--faiss-index", "IVF64,Flat"], "cannot build the faiss index 'IVF64,Flat' from 12 embeddings"),
    (["build", "--nprobe", "4"], "--nprobe, --ef-search, --rerank and --faiss-train-size need --faiss-index"),
    (["build", "--faiss-index", "HNSW32", "--nprobe", "4"], "nprobe does not apply to the faiss index 'HNSW32'"),
    (["build", "--faiss-index", "IVF2,Flat", "--rerank", "0"], "rerank must be a positive integer"),
    (["search", "--nprobe", "2"], "has no approximate faiss index"),
    (["search", "--exact", "--rerank", "2"], "apply to approximate search only"),
    (["ivf-search", "--ef-search", "2"], "ef_search does not apply to the faiss index 'IVF2,Flat'"),
    (["ivf-search", "--prefix", "/", "--nprobe", "2"], "a --prefix search is exact over the matching images"),
    (["serve", "--nprobe", "2"], "has no approximate faiss index"),
])
def test_cli_mistakes_are_one_line(setup, built, tmp_path, capsys, args, message):
    command, *flags = args
    argv = {"build": _build(setup, tmp_path / "out"), "search": ["search", str(built["plain"]), "a photo"],
            "ivf-search": ["search", str(built["ivf"]), "a photo"],
            "serve": ["serve", "--index", str(built["plain"]), "--port", "0"]}[command]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_cli_update_without_faiss_refuses_in_one_line(setup, tmp_path, capsys, monkeypatch):
    idx = tmp_path / "idx"
    assert main(_build(setup, idx, "--faiss-index", "IVF2,Flat")) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(["index", "update", str(idx)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs 'faiss-cpu'" in err and (idx / ANN_NAME).is_file()


def test_a_prefix_search_is_exact_and_ignores_the_approximate_settings(setup, built):
    """IVF2 probing one list returns only that list's images; a prefix search ranks every matching row exactly
    (the Python API and the web service ignore ANN settings for it, even ones that do not apply)."""
    index, model = ImageIndex.load(built["ivf"]), clip_pacl.load(setup / "model")
    approximate = search_text(index, model, "a photo", k=12, nprobe=1)[0]
    exact = search_text(index, model, "a photo", k=12, backend="torch")[0]
    assert len(approximate) < 12 == len(exact)
    prefix = str(setup / "photos") + "/"
    assert search_text(index, model, "a photo", k=12, prefix=prefix, nprobe=1, ef_search=8)[0] == exact
    service = WebService(model, index, search_settings={"nprobe": 1})
    assert len(service.search_text("a photo", 12)) == len(approximate)
    assert [r["path"] for r in service.search_text("a photo", 12, prefix="0")] == [
        Path(h.path).name for h in exact if Path(h.path).name.startswith("0")]
