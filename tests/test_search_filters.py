"""Search by path prefix (filtered before the top k) and table columns returned with results: the library,
`clip-pacl search --prefix`, `index build`/`update` from a table, the web API."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import CheckpointError, DataError
from clip_pacl.retrieval import ImageIndex, build_index, image_paths
from clip_pacl.retrieval.filters import prefix_rows, search_prefix, search_rows
from clip_pacl.retrieval.metadata import attach_metadata, table_metadata
from clip_pacl.retrieval.search import search_image, search_text
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """10 images: 4 in photos/cats, 2 in photos/cats2, 4 in photos/dogs; a table of them with a caption, a label and
    a JSON-only column (JSONL); a saved tiny model."""
    root = tmp_path_factory.mktemp("filters")
    generate_synthetic(root / "data", n=10, seed=2, image_size=48)
    photos = root / "photos"
    sources = sorted((root / "data" / "images").glob("*.png"))
    for i, src in enumerate(sources):
        folder = photos / ("cats" if i < 4 else "cats2" if i < 6 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / src.name)
    rows = [{"image": f"photos/{p.parent.name}/{p.name}", "caption": f"picture {i}", "label": p.parent.name,
             "extra": {"n": i, "tags": ["a", "b"]}}
            for i, p in enumerate(sorted(photos.rglob("*.png")))]
    with open(root / "table.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    clip_pacl.save(model, root / "model")
    assert main(["index", "build", "--model", str(root / "model"), "--images", str(root / "table.jsonl"),
                 "--out", str(root / "idx"), "--batch-size", "5", "--device", "cpu"]) == 0
    return root, model


def test_table_columns_are_stored_per_row_and_returned(setup):
    root, model = setup
    index = ImageIndex.load(root / "idx")
    assert len(index) == 10 and index.metadata is not None
    for path, meta in zip(index.paths, index.metadata):
        assert meta["label"] == Path(path).parent.name and meta["extra"]["tags"] == ["a", "b"]
        assert set(meta) == {"caption", "label", "extra"}  # not the image column
    hits = search_text(index, model, "a red circle", k=3)[0]
    for hit in hits:
        assert hit.metadata == index.metadata[index.paths.index(hit.path)]
    rows = [json.loads(line) for line in (root / "idx" / "paths.jsonl").read_text().splitlines()]
    assert rows[0]["metadata"] == index.metadata[0] and set(rows[0]) == {"path", "size", "mtime_ns", "metadata"}


def test_folder_indexes_have_no_metadata(setup, tmp_path):
    root, model = setup
    index, _ = build_index(model, image_paths(root / "photos"), progress=False)
    assert table_metadata(root / "photos") is None
    attach_metadata(index, None).save(tmp_path / "idx")
    loaded = ImageIndex.load(tmp_path / "idx")
    assert loaded.metadata is None and "metadata" not in (tmp_path / "idx" / "paths.jsonl").read_text()
    assert all(hit.metadata is None for hit in search_text(loaded, model, "a cat", k=4)[0])


def test_an_image_listed_twice_keeps_its_first_row(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "caption"), ("a.png", "first"), ("a.png", "second"), ("", "no image")])
    assert table_metadata(tmp_path / "t.csv", "file") == {str((tmp_path / "a.png").resolve()): {"caption": "first"}}
    with open(tmp_path / "only.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image",), ("a.png",)])
    assert table_metadata(tmp_path / "only.csv") is None  # no column besides the image's


def test_damaged_metadata_is_a_checkpoint_error(setup, tmp_path):
    root, _ = setup
    shutil.copytree(root / "idx", tmp_path / "idx")
    lines = (tmp_path / "idx" / "paths.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "metadata": ["not", "an", "object"]})
    (tmp_path / "idx" / "paths.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="damaged image index .*metadata of .* is not a JSON object"):
        ImageIndex.load(tmp_path / "idx")


def _random_index(n: int = 200, dim: int = 8) -> ImageIndex:
    g = torch.Generator().manual_seed(1)
    paths = [f"/img/{'a' if i % 3 else 'b'}/{i:03d}.png" for i in range(n)]
    return ImageIndex(F.normalize(torch.randn(n, dim, generator=g), dim=-1), paths,
                      metadata=[{"i": i} for i in range(n)])


@pytest.mark.parametrize("prefix, expected_rows", [
    ("/img/b/", list(range(0, 200, 3))),  # a third of the index: every row scored, the matching ones kept
    ("/img/b/00", [0, 3, 6, 9]),  # a few rows: gathered, then scored
])
def test_the_prefix_filters_before_the_top_k(prefix, expected_rows):
    index = _random_index()
    queries = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    rows = prefix_rows(index, prefix)
    assert rows == expected_rows
    scores = F.normalize(queries, dim=-1) @ index.embeddings.T  # (4, 200)
    for q, hits in enumerate(search_prefix(index, queries, 5, prefix)):
        expected = sorted(rows, key=lambda i: -float(scores[q, i]))[:5]
        assert [h.path for h in hits] == [index.paths[i] for i in expected]  # 5 under the prefix, not a top 5 filtered
        assert [h.metadata for h in hits] == [{"i": i} for i in expected]
        assert [h.score for h in hits] == pytest.approx([float(scores[q, i]) for i in expected], abs=1e-6)
    assert [len(h) for h in search_prefix(index, queries, 100, prefix)] == [len(rows)] * 4  # fewer match than k
    with pytest.raises(DataError, match="query features have shape"):
        search_prefix(index, queries[:, :4], 5, prefix)
    assert search_prefix(index, queries, 5, "/img/c") == [[], [], [], []]
    assert search_rows(index, queries, 3, []) == [[], [], [], []]
    with pytest.raises(ValueError, match="k must be at least 1"):
        search_rows(index, queries, 0, rows)


def test_prefix_rows_follow_the_paths():
    index = _random_index(10)
    assert prefix_rows(index, "/img/a/") == [1, 2, 4, 5, 7, 8] and prefix_rows(index, "/img/a/00") == [1, 2, 4, 5, 7, 8]
    assert prefix_rows(index, "/img/a/005") == [5] and prefix_rows(index, "/img/a/005.png") == [5]
    assert prefix_rows(index, "/img/a/005.png!") == [] and prefix_rows(index, "/img/") == list(range(10))
    index.paths = [p.replace("/a/", "/c/") for p in index.paths]  # the sorted order kept for the old paths is dropped
    assert prefix_rows(index, "/img/a/") == [] and prefix_rows(index, "/img/c/") == [1, 2, 4, 5, 7, 8]
    top = chr(0x10FFFF)  # the largest character: no bumped bound exists
    odd = ImageIndex(torch.eye(4), ["x" + top + "1", "x" + top, "y", "x"])
    assert prefix_rows(odd, "x" + top) == [0, 1] and prefix_rows(odd, "x") == [0, 1, 3]


@pytest.mark.parametrize("prefix, message", [
    (3, "must be a string, got int"),
    (Path("/img"), "must be a string, got PosixPath"),
    ("", "the path prefix is empty"),
    ("/img\0", "NUL"),
])
def test_bad_prefixes_are_one_sentence_errors(prefix, message):
    with pytest.raises(DataError, match=message):
        search_prefix(_random_index(), torch.randn(1, 8), 3, prefix)


def test_text_and_image_search_with_a_prefix(setup):
    root, model = setup
    index = ImageIndex.load(root / "idx")
    cats = str(root / "photos" / "cats")
    text_hits = search_text(index, model, "a blue square", k=10, prefix=cats)[0]
    assert len(text_hits) == 6 and all(h.path.startswith(cats) for h in text_hits)  # cats/ and cats2/
    assert len(search_text(index, model, "a blue square", k=10, prefix=cats + "/")[0]) == 4
    query = next(p for p in index.paths if "/dogs/" in p)
    assert search_image(index, model, query, k=2)[0].path == query
    image_hits = search_image(index, model, query, k=2, prefix=cats + "/")
    assert len(image_hits) == 2 and all("/cats/" in h.path for h in image_hits)
    assert search_text(index, model, "a cat", prefix=str(root / "nowhere")) == [[]]


def test_cli_prefix_table_output_and_json(setup, capsys, monkeypatch):
    root, _ = setup
    monkeypatch.chdir(root)  # a relative --prefix is taken from the current folder
    assert main(["search", "idx", "a red circle", "-k", "3", "--prefix", "photos/cats/", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prefix"] == str(root / "photos" / "cats") + "/" and out["matched"] == 4
    assert len(out["results"]) == 3
    for result in out["results"]:
        assert result["path"].startswith(str(root / "photos" / "cats") + "/")
        assert result["metadata"]["label"] == "cats" and result["metadata"]["caption"].startswith("picture ")

    assert main(["search", "idx", "a red circle", "-k", "2", "--prefix", "photos/dogs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "/photos/dogs/" in lines[0] and "/photos/dogs/" in lines[2]
    assert lines[1].split()[:2] == ["caption:", "picture"] and "label: dogs" in lines[1]
    assert 'extra: {"n": ' in lines[1]  # a JSON value shown as JSON

    assert main(["search", "idx", "a red circle", "--prefix", "photos/birds/"]) == 0
    message = capsys.readouterr().out.strip()
    assert message.startswith("no results: none of the 10 indexed images has a path starting with ")
    assert "\n" not in message and str(root / "photos" / "birds") in message
    assert main(["search", "idx", "a red circle", "--prefix", "photos/birds/", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == []

    assert main(["search", "idx", "a red circle", "--prefix", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the path prefix is empty (leave it out to search every image)"


def test_index_update_takes_the_tables_new_columns(setup, tmp_path, capsys):
    root, _ = setup
    work = tmp_path / "work"
    shutil.copytree(root / "photos", work / "photos")
    rows = [json.loads(line) for line in (root / "table.jsonl").read_text().splitlines()]
    (work / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["index", "build", "--model", str(root / "model"), "--images", str(work / "table.jsonl"),
                 "--out", str(work / "idx")]) == 0
    rows[2]["caption"] = "a new caption"
    (work / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["index", "update", str(work / "idx"), "--model", str(root / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["reused"] == 10  # nothing re-embedded
    updated = ImageIndex.load(work / "idx")
    assert updated.metadata[2]["caption"] == "a new caption" and updated.metadata[3]["caption"] == "picture 3"


def test_web_api_prefix_and_metadata(setup):
    from helpers import require

    require("fastapi")
    httpx = require("httpx")
    require("uvicorn")
    from clip_pacl_app.web import WebService, create_app
    from webserver import post, running

    root, model = setup
    index = ImageIndex.load(root / "idx")
    with running(create_app(WebService(model, index, "tiny", "idx"))) as url:
        response = httpx.get(f"{url}/api/search", params={"q": "a red circle", "k": 3, "prefix": "cats/"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["prefix"] == "cats/" and len(body["results"]) == 3 and str(root) not in response.text
        for result in body["results"]:
            assert result["path"].startswith("cats/") and result["metadata"]["label"] == "cats"
        assert len(httpx.get(f"{url}/api/search", params={"q": "x", "k": 9, "prefix": "cats"}).json()["results"]) == 6
        assert httpx.get(f"{url}/api/search", params={"q": "x", "prefix": "birds/"}).json()["results"] == []
        assert len(httpx.get(f"{url}/api/search", params={"q": "x", "k": 9, "prefix": ""}).json()["results"]) == 9
        assert httpx.get(f"{url}/api/search", params={"q": "x", "prefix": "../" * 20 + "etc"}).json()["results"] == []
        too_long = httpx.get(f"{url}/api/search", params={"q": "x", "prefix": "a" * 1001})
        assert too_long.status_code == 400 and "at most 1000" in too_long.json()["error"]
        query = next(p for p in index.paths if "/dogs/" in p)
        by_image = post(f"{url}/api/search", files={"image": ("q.png", Path(query).read_bytes(), "image/png")},
                        data={"k": "2", "prefix": "dogs/"})
        assert by_image.status_code == 200
        results = by_image.json()["results"]
        assert results[0]["path"] == "dogs/" + Path(query).name and all(r["path"].startswith("dogs/") for r in results)


def test_the_benchmark_script_runs(tmp_path):
    """benchmarks/index_sharded.py's search part (its build part launches torchrun, as test_index_sharded does)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "index_sharded.py"
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(script), "--skip-build", "--rows", "2000", "--dim", "16",
                           "--fractions", "0.01", "0.5", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prefix_fraction"] for r in rows] == ["none", 0.01, 0.5] and rows[0]["matched"] == 2000
    assert 0 < rows[1]["matched"] < rows[2]["matched"] < 2000 and all(r["ms_per_batch"] > 0 for r in rows)
    assert "search: prefix share" in proc.stdout
