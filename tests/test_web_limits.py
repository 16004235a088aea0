"""The server's resource policy (`web/limits.py`) and what it may open: a request's cost is refused before any work
(prompts, pixels), the inference queue answers 503 with Retry-After when full and serves a small request between a
big one's turns, the classifier cache stays within its bound, only regular files are opened (a FIFO in an index
never hangs a worker), and index rows outside the indexed folder are never shown."""

import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

import clip_pacl  # noqa: E402
from clip_pacl.data.images import decode_cost, decode_image_bytes, load_image  # noqa: E402
from clip_pacl.data.synthetic import generate_synthetic  # noqa: E402
from clip_pacl.errors import DataError  # noqa: E402
from clip_pacl.retrieval import ImageIndex, build_index, image_paths  # noqa: E402
from clip_pacl.zeroshot.classifier import build_classifier  # noqa: E402
from clip_pacl_app.cli.main import main  # noqa: E402
from clip_pacl_app.web import WebService, create_app  # noqa: E402
from clip_pacl_app.web.limits import InferenceQueue, LimitExceeded, Limits  # noqa: E402
from webserver import post, running  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    generate_synthetic(root / "data", n=6, seed=0, image_size=48)
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    clip_pacl.save(model, root / "model")
    images = root / "data" / "images"
    index, _ = build_index(model, image_paths(images), batch_size=8, model_source=str(root / "model"),
                           progress=False, root=images)
    index.save(root / "idx")
    return {"root": root, "model": model, "index": index, "images": images}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


SMALL = _png(Image.new("RGB", (40, 40), (200, 30, 30)))


# ---------------------------------------------------------------------------------------------- request cost
def test_prompt_count_is_capped_before_any_work(setup):
    """100 labels x 100 templates (10,000 prompts, each under its own cap) is one 413 naming --max-prompts, answered
    before the upload is even decoded (the upload here is not an image at all)."""
    labels = ",".join(f"thing {i}" for i in range(100))
    templates = "\n".join(f"a picture {j} of a {{}}." for j in range(100))
    with running(create_app(WebService(setup["model"], setup["index"]))) as url:
        for endpoint in ("/api/classify", "/api/segment"):
            started = time.monotonic()
            response = post(f"{url}{endpoint}", data={"labels": labels, "templates": templates},
                            files={"image": ("x.png", b"not an image")}, timeout=60)
            assert response.status_code == 413, response.text
            assert "10000 prompt encodings" in response.json()["error"] and "--max-prompts" in response.json()["error"]
            assert time.monotonic() - started < 30
        ok = post(f"{url}/api/classify", data={"labels": "a,b", "templates": "simple"},
                  files={"image": ("x.png", SMALL)}, timeout=60)
        assert ok.status_code == 200


def test_decode_cost_is_checked_from_the_header(setup):
    """A 16-bit image's decode is priced by its mode (2 bytes a sample, plus what converting it holds): one whose
    cost exceeds the whole budget is refused (413) without decoding; the same pixels in 8-bit fit."""
    grey16 = _png(Image.fromarray(np.full((600, 600), 40000, dtype=np.uint16)))
    grey8 = _png(Image.new("L", (600, 600), 128))
    budget = (decode_cost(600, 600, "I;16") + decode_cost(600, 600, "L")) // 2
    assert decode_cost(600, 600, "L") < budget < decode_cost(600, 600, "I;16")
    service = WebService(setup["model"], setup["index"], limits=Limits(decode_budget_bytes=budget))
    with running(create_app(service)) as url:
        refused = post(f"{url}/api/classify", data={"labels": "a,b"}, files={"image": ("g.png", grey16)})
        assert refused.status_code == 413 and "--decode-budget-mb" in refused.json()["error"]
        assert post(f"{url}/api/classify", data={"labels": "a,b"}, files={"image": ("g.png", grey8)}).status_code == 200


def test_patches_scored_are_capped(setup):
    """classes x patch-grid cells of a segmentation: a wide image's grid is priced before the model runs."""
    service = WebService(setup["model"], None, limits=Limits(max_patch_scores=200))
    square, wide = Image.new("RGB", (64, 64)), Image.new("RGB", (640, 64))
    assert service.segment(square, ["a", "b"])["method"] == "patch"  # 2 x 64 patches (tiny: 64 px, stride 8)
    with pytest.raises(LimitExceeded, match="2 classes x 640 patches"):
        service.segment(wide, ["a", "b"])


def test_16_bit_scaling_is_unchanged_by_blocks():
    """The 8-bit scaling works block by block (bounded temporaries); the pixels equal the whole-array formula."""
    values = np.random.default_rng(0).integers(0, 65536, (800, 1000), dtype=np.uint16)  # two blocks and a bit
    decoded = np.asarray(decode_image_bytes(_png(Image.fromarray(values)), "x"))[..., 0]
    assert np.array_equal(decoded, np.clip(np.round(values * (255 / 65535)), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- queue and cache
def test_a_full_queue_answers_503_with_retry_after(setup):
    service = WebService(setup["model"], setup["index"], limits=Limits(queue_depth=1, retry_after_s=7))
    with running(create_app(service)) as url:
        with service.admitted():  # the one place in the queue is taken
            busy = post(f"{url}/api/classify", data={"labels": "a,b"}, files={"image": ("x.png", SMALL)})
            text = httpx.get(f"{url}/api/search", params={"q": "red"})
            health = httpx.get(f"{url}/api/health")
        assert busy.status_code == text.status_code == 503 and busy.headers["retry-after"] == "7"
        assert "busy" in busy.json()["error"] and health.status_code == 200
        assert post(f"{url}/api/classify", data={"labels": "a,b"}, files={"image": ("x.png", SMALL)}).status_code == 200


def test_turns_are_first_come_first_served():
    """A request that takes many turns goes to the back of the line after each: a request arriving meanwhile runs
    after at most one more of its turns, not after all of them."""
    queue = InferenceQueue(depth=4, retry_after_s=1)
    order: list[str] = []
    started = threading.Event()

    def big():
        for i in range(20):
            with queue.turn():
                order.append(f"big{i}")
                started.set()
                time.sleep(0.02)

    thread = threading.Thread(target=big)
    thread.start()
    started.wait(10)
    with queue.turn():
        order.append("small")
    thread.join(10)
    assert order.index("small") <= order.index("big0") + 2, order


def test_class_embeddings_are_chunked_cached_and_bounded(setup):
    """Prompts are encoded in turns of prompt_chunk; the classes equal build_classifier's; the cache never holds
    more than cache_entries class embeddings, and a class seen before is not encoded again."""
    model = setup["model"]
    service = WebService(model, None, limits=Limits(prompt_chunk=3, cache_entries=5))
    labels = [f"shape {i}" for i in range(12)]
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    got = service.class_embeddings(model, labels, templates)
    assert torch.allclose(got, build_classifier(model, labels, templates), atol=1e-5)
    assert len(service._class_embeddings) == 5
    calls = []
    original = model.encode_text
    model.encode_text = lambda *a, **k: calls.append(len(a[0])) or original(*a, **k)
    try:
        service.class_embeddings(model, labels[-2:], templates)  # still cached
        assert calls == []
        service.class_embeddings(model, labels[:2], templates)  # evicted: encoded again, in chunks of 3
        assert calls == [3, 3]
    finally:
        del model.encode_text
    assert len(service._class_embeddings) == 5


# ---------------------------------------------------------------------------------------------- what is opened
def test_load_image_opens_regular_files_only(tmp_path):
    """A FIFO is refused at once (opening it for reading would wait for a writer forever), as is a folder."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    errors = []
    reader = threading.Thread(target=lambda: errors.append(_error_of(load_image, fifo)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_image blocked on a FIFO")
    assert "not a regular file" in errors[0]
    assert "is a directory" in _error_of(load_image, tmp_path)


def _error_of(function, *args) -> str:
    try:
        function(*args)
    except DataError as e:
        return str(e)
    return "no error"


def _index_with_rows(setup, out: Path, paths: list[str], **meta) -> ImageIndex:
    index = setup["index"]
    rows = ImageIndex(index.embeddings[:len(paths)].clone(), paths, {**index.meta, "count": len(paths), **meta})
    rows.save(out)
    return ImageIndex.load(out)


def test_a_fifo_in_an_index_never_hangs_the_server(setup, tmp_path):
    """An index row naming a FIFO: 50 thumbnail requests are 404s, and /api/health keeps answering."""
    images = tmp_path / "images"
    images.mkdir()
    fifo = images / "pipe.png"
    os.mkfifo(fifo)
    good = images / "good.png"
    good.write_bytes(SMALL)
    index = _index_with_rows(setup, tmp_path / "idx", [str(fifo), str(good)], root=str(images))
    with running(create_app(WebService(setup["model"], index))) as url, httpx.Client(timeout=20) as client:
        statuses = [client.get(f"{url}/thumb/0").status_code for _ in range(50)]
        assert set(statuses) == {404}
        assert client.get(f"{url}/api/health").status_code == 200
        assert client.get(f"{url}/thumb/1").status_code == 200


def test_rows_outside_the_indexed_folder_are_never_shown(setup, tmp_path):
    """A paths.jsonl naming an image elsewhere (absolute, or `..` out of the root), and a row whose file became a
    symlink to an outside image after the build: none is thumbnailed nor listed in a search."""
    images, outside = tmp_path / "images", tmp_path / "private"
    images.mkdir()
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(_png(Image.new("RGB", (40, 40), (1, 2, 3))))
    inside = images / "ok.png"
    inside.write_bytes(SMALL)
    swapped = images / "swapped.png"
    swapped.symlink_to(secret)
    paths = [str(secret), str(images / ".." / "private" / "secret.png"), str(swapped), str(inside)]
    index = _index_with_rows(setup, tmp_path / "idx", paths, root=str(images))
    with running(create_app(WebService(setup["model"], index))) as url:
        assert [httpx.get(f"{url}/thumb/{i}").status_code for i in range(4)] == [404, 404, 404, 200]
        results = httpx.get(f"{url}/api/search", params={"q": "a photo", "k": 4}).json()["results"]
        assert [r["id"] for r in results] == [3]
        shown = post(f"{url}/api/search", files={"image": ("q.png", SMALL)}, data={"k": "4"}).json()["results"]
        assert [r["id"] for r in shown] == [3]
    allowed = _index_with_rows(setup, tmp_path / "idx2", paths, root=str(images), allow_outside_root=True)
    with running(create_app(WebService(setup["model"], allowed))) as url:
        assert [httpx.get(f"{url}/thumb/{i}").status_code for i in range(4)] == [200, 200, 200, 200]


def test_index_build_refuses_a_symlink_out_of_the_folder(setup, tmp_path, capsys):
    """`index build` on a folder holding a symlink to an outside image: one line, exit 2, unless
    --allow-outside-root, which meta.json records."""
    images, outside = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir()
    outside.mkdir()
    (outside / "other.png").write_bytes(SMALL)
    (images / "mine.png").write_bytes(SMALL)
    (images / "link.png").symlink_to(outside / "other.png")
    args = ["index", "build", "--model", str(setup["root"] / "model"), "--images", str(images)]
    assert main([*args, "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of the 2 images resolve outside") and "--allow-outside-root" in err
    assert err.count("\n") == 1 and not (tmp_path / "idx").exists()
    assert main([*args, "--out", str(tmp_path / "idx"), "--allow-outside-root"]) == 0
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["allow_outside_root"] is True and meta["root"] == str(images.resolve())


def test_serve_does_not_load_a_model_an_index_names_elsewhere(setup, tmp_path, capsys):
    """`serve --index IDX` without --model loads the recorded model only when it sits beside the index."""
    index = ImageIndex.load(setup["root"] / "idx")
    index.meta["model"] = str(tmp_path / "far" / "model")
    index.save(tmp_path / "moved" / "idx")
    assert main(["serve", "--index", str(tmp_path / "moved" / "idx"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "which is not beside the index" in err and "pass --model" in err and err.count("\n") == 1
    for flag in ("--max-prompts", "--queue", "--decode-budget-mb"):
        assert main(["serve", "--model", "tiny", flag, "0", "--port", "0"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flag} must be")
