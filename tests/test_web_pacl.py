"""One server for the demo's pair: an index built with a CLIP, searched with that CLIP, while a PACL model trained on
it classifies and segments; and the page's record of what the model was trained on."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import clip_pacl  # noqa: E402
from clip_pacl.data.synthetic import generate_synthetic  # noqa: E402
from clip_pacl.errors import DataError  # noqa: E402
from clip_pacl.models.pacl import PACL  # noqa: E402
from clip_pacl.retrieval import build_index, image_paths  # noqa: E402
from clip_pacl.retrieval.search import search_encoder, search_text  # noqa: E402
from clip_pacl.train.record import read_record, write_record  # noqa: E402
from webserver import post, serve_process  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny CLIP, its index, and a PACL model on that CLIP saved as a run's final model with its record."""
    root = tmp_path_factory.mktemp("pair")
    generate_synthetic(root / "data", n=6, seed=0, image_size=48)
    torch.manual_seed(0)
    clip = clip_pacl.load("tiny").eval()
    clip_pacl.save(clip, root / "clip" / "final")
    index, _ = build_index(clip, image_paths(root / "data" / "images"), model_source=str(root / "clip" / "final"),
                           progress=False)
    index.save(root / "index")
    pacl = PACL(clip).eval()
    clip_pacl.save(pacl, root / "pacl" / "final")
    write_record(root / "pacl" / "final", {"data": str(root / "data" / "captions.csv"), "objective": "pacl",
                                           "model": str(root / "clip" / "final")}, 300)
    return {"root": root, "clip": clip, "pacl": pacl, "index": index}


def test_a_pacl_model_serves_the_index_of_its_clip(pair):
    """`serve --model PACL --index IDX-of-its-CLIP`: search answers as the CLIP would, segmentation uses PACL, and the
    health answer says what the model was trained on."""
    root = pair["root"]
    with serve_process("--model", str(root / "pacl"), "--index", str(root / "index")) as (url, _):
        health = httpx.get(f"{url}/api/health").json()
        assert health["model_type"] == "PACL" and health["default_segment_method"] == "pacl"
        assert health["index"]["searched_with"] == "base CLIP"
        assert health["trained_on"] == {"data": "data/captions.csv", "from": "clip/final", "objective": "pacl",
                                        "steps": 300, "unit": "steps"}
        results = httpx.get(f"{url}/api/search", params={"q": "a red circle", "k": 3}).json()["results"]
        expected = search_text(pair["index"], pair["clip"], "a red circle", 3)[0]
        assert [r["path"] for r in results] == [Path(h.path).name for h in expected]
        image = Path(pair["index"].paths[0]).read_bytes()
        segmented = post(f"{url}/api/segment", data={"labels": "background, circle"}, files={"image": ("x.png", image)})
        assert segmented.status_code == 200 and segmented.json()["method"] == "pacl"


def test_a_pacl_model_on_another_clip_is_refused(pair):
    """The base CLIP must be the one that built the index (same weights fingerprint), not one of the same shape."""
    assert search_encoder(pair["index"], pair["pacl"]) is pair["pacl"].clip
    assert search_encoder(pair["index"], pair["clip"]) is pair["clip"]
    torch.manual_seed(1)
    other = PACL(clip_pacl.load("tiny")).eval()
    with pytest.raises(DataError, match="other weights"):
        search_encoder(pair["index"], other)


def test_the_training_record_is_found_from_a_run_or_its_model(pair, tmp_path):
    """The record beside the model; for a model trained before records, its run's train_config.json."""
    root = pair["root"]
    assert read_record(root / "pacl") == read_record(root / "pacl" / "final")
    assert read_record(root / "pacl")["data"] == "data/captions.csv"
    old = tmp_path / "run"
    (old / "final").mkdir(parents=True)
    (old / "train_config.json").write_text('{"data": "/x/my/pairs.csv", "model": "tiny", "epochs": 2}')
    assert read_record(old / "final") == {"data": "my/pairs.csv", "from": "tiny", "objective": None, "steps": 2,
                                          "unit": "epochs"}
    assert read_record(tmp_path) is None
