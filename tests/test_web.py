"""`clip-pacl serve`: a real uvicorn server on localhost, hit over HTTP; answers checked against the library.

Covers every endpoint's shape and numbers, the upload cap (413, declared and streamed), bad uploads (400),
path traversal attempts (404, nothing leaked), the server without an index and the CLI. The page in a real
headless browser: tests/test_web_browser.py.
"""

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import require

require("fastapi")
httpx = require("httpx")
uvicorn = require("uvicorn")

from PIL import Image  # noqa: E402

import clip_pacl  # noqa: E402
from clip_pacl.data.synthetic import generate_synthetic  # noqa: E402
from clip_pacl.retrieval import build_index, image_paths  # noqa: E402
from clip_pacl.retrieval.search import search_text  # noqa: E402
from clip_pacl.segmentation.overlay import overlay_image  # noqa: E402
from clip_pacl.segmentation.predict import segment  # noqa: E402
from clip_pacl.transforms import image_transform  # noqa: E402
from clip_pacl.zeroshot.classifier import build_classifier, class_probabilities  # noqa: E402
from clip_pacl_app.cli.main import build_parser, main  # noqa: E402
from clip_pacl_app.web import WebService, create_app  # noqa: E402
from webserver import post, raw_request, running, serve_process  # noqa: E402

UPLOAD_CAP = 64 * 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """8 synthetic images, a saved tiny model, an index of the images; servers with and without the index."""
    root = tmp_path_factory.mktemp("web")
    generate_synthetic(root / "data", n=8, seed=0, image_size=64)
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    clip_pacl.save(model, root / "model")
    index, _ = build_index(model, image_paths(root / "data" / "images"), batch_size=8,
                           model_source=str(root / "model"), progress=False)
    index.save(root / "idx")
    with running(create_app(WebService(model, index, "tiny-test", "idx"), max_upload_bytes=UPLOAD_CAP)) as url, \
            running(create_app(WebService(model, None, "tiny-test"))) as bare_url:
        yield {"root": root, "model": model, "index": index, "url": url, "bare_url": bare_url}


def png_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def first_image(setup) -> Path:
    return Path(setup["index"].paths[3])


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    return raw_request(url, "GET", target, {"Host": "127.0.0.1"})


def test_health(setup):
    body = httpx.get(f"{setup['url']}/api/health").json()
    assert body["status"] == "ok" and body["model"] == "tiny-test" and body["model_type"] == "CLIP"
    assert body["embed_dim"] == setup["model"].embed_dim and body["image_size"] == 64 and body["device"] == "cpu"
    assert body["index"] == {"name": "idx", "count": 8, "searched_with": "model"}
    assert body["segment_methods"] == ["patch", "maskclip"] and body["default_segment_method"] == "patch"
    assert body["max_upload_mb"] == UPLOAD_CAP / 2**20
    assert httpx.get(f"{setup['bare_url']}/api/health").json()["index"] is None


def test_search_by_text_matches_the_library(setup):
    index, model = setup["index"], setup["model"]
    response = httpx.get(f"{setup['url']}/api/search", params={"q": "a red circle", "k": 5})
    assert response.status_code == 200
    results = response.json()["results"]
    expected = search_text(index, model, "a red circle", 5)[0]
    assert [r["path"] for r in results] == [Path(h.path).name for h in expected]  # relative to the indexed folder
    assert str(setup["root"]) not in response.text  # no absolute path of the server's files
    np.testing.assert_allclose([r["score"] for r in results], [h.score for h in expected], atol=1e-6)
    for r in results:
        assert r["thumbnail"] == f"/thumb/{r['id']}" and Path(index.paths[r["id"]]).name == r["path"]
    many = httpx.get(f"{setup['url']}/api/search", params={"q": "shapes", "k": 50}).json()["results"]
    assert len(many) == 8  # k is capped at the index size


def test_thumbnail_is_the_indexed_image_of_that_id(setup):
    index = setup["index"]
    for image_id in (0, 5):
        response = httpx.get(f"{setup['url']}/thumb/{image_id}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        thumb = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float32)
        errors = [np.abs(thumb - np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).mean()
                  for p in index.paths]
        assert int(np.argmin(errors)) == image_id and errors[image_id] < 8  # JPEG-close to its own image only


def test_search_by_image_finds_the_image_itself(setup):
    path = first_image(setup)
    response = post(f"{setup['url']}/api/search", files={"image": ("q.png", png_bytes(path), "image/png")},
                          data={"k": "3"})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3 and results[0]["path"] == path.name and results[0]["score"] == pytest.approx(1, abs=1e-4)
    assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]


def test_classify_matches_the_library(setup):
    model, path = setup["model"], first_image(setup)
    labels = ["red circle", "blue square", "green triangle"]
    response = post(f"{setup['url']}/api/classify", files={"image": ("x.png", png_bytes(path), "image/png")},
                          data={"labels": " red circle, blue square,green triangle ", "templates": "a photo of a {}."})
    assert response.status_code == 200
    body = response.json()
    assert body["labels"] == labels and body["num_templates"] == 1
    probs = class_probabilities(model, image_transform(64)(Image.open(path).convert("RGB"))[None],
                                build_classifier(model, labels, ["a photo of a {}."]))[0]
    got = {p["label"]: p["probability"] for p in body["predictions"]}
    assert got == pytest.approx(dict(zip(labels, probs.tolist())), abs=1e-5)
    assert [p["probability"] for p in body["predictions"]] == sorted(got.values(), reverse=True)
    default = post(f"{setup['url']}/api/classify", files={"image": ("x.png", png_bytes(path), "image/png")},
                         data={"labels": "cat,dog"}).json()
    assert default["num_templates"] == 80 and sum(p["probability"] for p in default["predictions"]) == pytest.approx(1)


def test_segment_matches_the_library_and_draws_an_overlay(setup):
    model, path = setup["model"], first_image(setup)
    labels = ["background", "circle", "square"]
    for method in ("patch", "maskclip"):
        response = post(f"{setup['url']}/api/segment", files={"image": ("x.png", png_bytes(path), "image/png")},
                              data={"labels": ",".join(labels), "method": method})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["method"] == method and body["size"] == [64, 64] and body["labels"] == labels
        expected = segment(model, Image.open(path).convert("RGB"), labels, method=method)
        assert body["fractions"] == pytest.approx(expected.fractions(), abs=1e-9)
        assert sum(body["fractions"].values()) + body["unassigned"] == pytest.approx(1)
        assert body["colors"] == {"background": "#282828", "circle": "#e6194b", "square": "#3cb44b"}  # class_colors
        assert body["overlay"].startswith("data:image/png;base64,")
        overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"].split(",", 1)[1])))
        assert overlay.format == "PNG" and overlay.size == (256, 256)  # enlarged; the page draws the legend
        drawn = overlay_image(Image.open(path).convert("RGB"), expected.label_map, labels, legend=False)
        np.testing.assert_array_equal(np.asarray(overlay.convert("RGB")), np.asarray(drawn))
    thresholded = post(f"{setup['url']}/api/segment", files={"image": ("x.png", png_bytes(path), "image/png")},
                             data={"labels": "circle,square", "background_threshold": "2"}).json()
    assert thresholded["unassigned"] == 1.0  # cosine never reaches 2: every pixel is left unassigned


@pytest.mark.parametrize("endpoint, data, message", [
    ("/api/classify", {"labels": "a,b"}, "not an image"),
    ("/api/segment", {"labels": "a,b"}, "not an image"),
    ("/api/search", {}, "not an image"),
])
def test_non_image_upload_is_400(setup, endpoint, data, message):
    response = post(f"{setup['url']}{endpoint}", data=data,
                          files={"image": ("evil.png", b"#!/bin/sh\necho not a picture\n", "image/png")})
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error and "\n" not in error


def test_bad_form_fields_are_400(setup):
    url, png = setup["url"], png_bytes(first_image(setup))
    cases = [
        ("/api/classify", {}, "missing field 'labels'"),
        ("/api/classify", {"labels": " , ,"}, "no labels"),
        ("/api/classify", {"labels": "a,b,a"}, "repeated: a"),
        ("/api/classify", {"labels": "a,b", "templates": "no slot here"}, "has no '{}'"),
        ("/api/segment", {"labels": "a,b", "method": "pacl"}, "'pacl' is not available"),
        ("/api/segment", {"labels": "a,b", "background_threshold": "high"}, "background_threshold"),
        ("/api/search", {"k": "0"}, "k must be between 1 and 100"),
    ]
    for endpoint, data, message in cases:
        response = post(f"{url}{endpoint}", data=data, files={"image": ("x.png", png, "image/png")})
        assert response.status_code == 400 and message in response.json()["error"], (endpoint, data, response.text)
    no_file = post(f"{url}/api/classify", data={"labels": "a,b"})
    assert no_file.status_code == 400 and no_file.json()["error"] == "missing field 'image'"
    for params, message in [({"q": "  "}, "empty"), ({"q": "x", "k": "lots"}, "k:"), ({}, "missing field 'q'")]:
        response = httpx.get(f"{url}/api/search", params=params)
        assert response.status_code == 400 and message in response.json()["error"], params


def test_labels_and_templates_are_never_read_as_files(setup, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top-secret-label\n")
    response = post(f"{setup['url']}/api/classify", files={"image": ("x.png", png_bytes(first_image(setup)))},
                          data={"labels": f"{secret},dog", "templates": str(secret)})
    assert response.status_code == 400 and "top-secret" not in response.text  # the path is a template with no slot
    response = post(f"{setup['url']}/api/classify", files={"image": ("x.png", png_bytes(first_image(setup)))},
                          data={"labels": f"{secret},dog", "templates": "simple"})
    assert response.status_code == 200 and "top-secret" not in response.text
    assert {p["label"] for p in response.json()["predictions"]} == {str(secret), "dog"}


def test_uploads_over_the_cap_are_413(setup):
    url = setup["url"]
    big = os.urandom(UPLOAD_CAP + 10_000)
    response = post(f"{url}/api/classify", files={"image": ("big.png", big, "image/png")}, data={"labels": "a,b"})
    assert response.status_code == 413 and "limit of 0.0625 MB" in response.json()["error"]

    boundary = "clippaclboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()

    def chunks():  # no Content-Length: the server must count the body as it streams in
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    response = post(f"{url}/api/search", content=chunks(),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "error" in response.json()
    assert httpx.get(f"{url}/api/health").status_code == 200  # and the server carries on


@pytest.mark.parametrize("target", [
    "/thumb/../../etc/passwd",
    "/thumb/..%2f..%2f..%2fetc%2fpasswd",
    "/thumb/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/thumb/%2e%2e",
    "/thumb/%2fetc%2fpasswd",
    "/thumb/-1",
    "/thumb/8",
    "/thumb/1e0",
    "/thumb/0x1",
    "/thumb/%201",
    "/thumb/1%00",
    "/thumb/%D9%A3",  # an Arabic-Indic digit three
    "/thumb/99999999999999999999999",
    "/thumb?path=/etc/passwd",
    "/etc/passwd",
    "/static/../../../../etc/passwd",
    "/static/..%2f..%2fapp.py",
    "/static/%2e%2e/app.py",
    "/static/app.py",
    "/static/",
    "/../../../../etc/passwd",
])
def test_traversal_attempts_are_404_and_leak_nothing(setup, target):
    status, body = raw_get(setup["url"], target)
    assert status == 404, (target, status, body[:200])
    assert b"root:" not in body and b"import" not in body and b"\xff\xd8" not in body[:2]


def test_only_indexed_images_by_id(setup):
    status, body = raw_get(setup["url"], "/thumb/0?path=/etc/passwd&file=../../etc/passwd")
    assert status == 200 and body[:2] == b"\xff\xd8" and b"root:" not in body  # query parameters are ignored
    status, body = raw_get(setup["url"], "/static/app.js")
    assert status == 200 and b"use strict" in body


def test_without_index_search_is_404_but_classify_works(setup):
    url, png = setup["bare_url"], png_bytes(first_image(setup))
    response = httpx.get(f"{url}/api/search", params={"q": "a red circle"})
    assert response.status_code == 404 and "--index" in response.json()["error"]
    response = post(f"{url}/api/search", files={"image": ("x.png", png, "image/png")})
    assert response.status_code == 404 and "--index" in response.json()["error"]
    assert httpx.get(f"{url}/thumb/0").status_code == 404
    response = post(f"{url}/api/classify", files={"image": ("x.png", png)}, data={"labels": "a,b"})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2
    response = post(f"{url}/api/segment", files={"image": ("x.png", png)}, data={"labels": "a,b"})
    assert response.status_code == 200 and set(response.json()["fractions"]) == {"a", "b"}


def test_page_and_its_files(setup):
    response = httpx.get(f"{setup['url']}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    html = response.text
    for needed in ('id="search-form"', 'id="image-search-form"', 'id="classify-form"', 'id="segment-form"',
                   'src="/static/app.js"', 'href="/static/style.css"'):
        assert needed in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere: the machine may be offline
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{setup['url']}/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "http://" not in response.text and "https://" not in response.text


def test_cli_help_and_default_host(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--index", "--host", "--port", "--max-upload-mb", "--device"):
        assert flag in help_text
    args = build_parser().parse_args(["serve", "--model", "tiny", "--random-weights"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_upload_mb == 10.0


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    assert main(["serve", "--model", "tiny", "--random-weights", "--index", str(tmp_path / "nope")]) == 2
    assert "is not an image index" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--random-weights", "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb must be positive" in capsys.readouterr().err
    taken = int(setup["url"].rsplit(":", 1)[1])
    assert main(["serve", "--model", "tiny", "--random-weights", "--port", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{taken}") and err.count("\n") == 1


def test_cli_serve_runs_a_server(setup):
    """The real command: loads the model named in the index, honours --max-upload-mb, answers on 127.0.0.1."""
    root = setup["root"]
    with serve_process("--index", str(root / "idx"), "--max-upload-mb", "0.01") as (url, _):
        health = httpx.get(f"{url}/api/health").json()
        assert health["index"]["count"] == 8 and health["model"] == "model"
        assert health["max_upload_mb"] == 0.01
        results = httpx.get(f"{url}/api/search", params={"q": "a red circle", "k": 3}).json()["results"]
        expected = search_text(setup["index"], setup["model"], "a red circle", 3)[0]
        assert [r["path"] for r in results] == [Path(h.path).name for h in expected]  # the same weights, reloaded
        response = post(f"{url}/api/classify", files={"image": ("x.bin", os.urandom(20_000))},
                              data={"labels": "a,b"})
        assert response.status_code == 413


def test_pacl_model_segments_with_its_own_method(setup):
    """A PACL checkpoint offers all three methods and segments with 'pacl' by default; classify goes through
    its patch-aligned similarity (the same numbers as the library's classifier)."""
    from clip_pacl.models.pacl import PACL

    pacl = PACL(setup["model"]).eval()
    service = WebService(pacl, setup["index"], "pacl-test")
    health = service.health()
    assert health["segment_methods"] == ["pacl", "patch", "maskclip"] and health["default_segment_method"] == "pacl"
    image = Image.open(first_image(setup)).convert("RGB")
    result = service.segment(image, ["background", "circle"])
    expected = segment(pacl, image, ["background", "circle"], method="pacl").fractions()
    assert result["method"] == "pacl" and result["fractions"] == pytest.approx(expected, abs=1e-9)
    predictions = service.classify(image, ["circle", "square"], ["a photo of a {}."])
    probs = class_probabilities(pacl, image_transform(64)(image)[None],
                                build_classifier(pacl, ["circle", "square"], ["a photo of a {}."]))[0]
    assert {p["label"]: p["probability"] for p in predictions} == pytest.approx(
        dict(zip(["circle", "square"], probs.tolist())), abs=1e-5)
