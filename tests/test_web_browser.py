"""The page of `clip-pacl serve` in a real headless chromium: every tab, driven as a person would.

A tiny random CLIP and an index of 10 synthetic images behind a real uvicorn server; the page's results are
checked against the library's own answers for the same inputs. Waits are on DOM conditions only.
Under CI=true a missing selenium, chromium or chromedriver fails the module; elsewhere it is skipped.
"""

import re
from pathlib import Path

import pytest
import torch

from helpers import require, require_program

require("fastapi")
require("uvicorn")
require("selenium")

from PIL import Image  # noqa: E402

import clip_pacl  # noqa: E402
from browser import CHROMEDRIVER, CHROMIUM, Page, chromium, find_program  # noqa: E402
from clip_pacl.data.synthetic import generate_synthetic  # noqa: E402
from clip_pacl.retrieval import build_index, image_paths  # noqa: E402
from clip_pacl.retrieval.search import search_image, search_text  # noqa: E402
from clip_pacl.segmentation.overlay import class_colors  # noqa: E402
from clip_pacl_app.web import WebService, create_app  # noqa: E402
from webserver import running  # noqa: E402

BROWSER = require_program("chromium", find_program(CHROMIUM), "apt-get install chromium")
DRIVER = require_program("chromedriver", find_program(CHROMEDRIVER), "apt-get install chromium-driver")
UPLOAD_CAP = 256 * 1024
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server over 10 synthetic images (and one without an index), and a browser."""
    root = tmp_path_factory.mktemp("browser")
    generate_synthetic(root / "data", n=10, seed=0, image_size=64)
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    index, _ = build_index(model, image_paths(root / "data" / "images"), batch_size=10, model_source="tiny",
                           progress=False)
    index.metadata = [{"caption": f"caption of picture {i}"} for i in range(len(index))]  # as a table's column
    service = WebService(model, index, "tiny-test", "idx",
                         trained_on={"data": "train/captions.csv", "from": None, "objective": "clip", "steps": 30,
                                     "unit": "steps"})
    not_an_image = root / "notes.txt"
    not_an_image.write_text("these are notes, not a picture\n")
    too_large = root / "large.png"
    too_large.write_bytes(b"\x89PNG" + bytes(UPLOAD_CAP))
    with running(create_app(service, max_upload_bytes=UPLOAD_CAP)) as url, \
            running(create_app(WebService(model, None, "tiny-test"))) as bare_url, chromium(BROWSER, DRIVER) as driver:
        yield {"root": root, "model": model, "index": index, "service": service, "url": url, "bare_url": bare_url,
               "driver": driver, "not_an_image": not_an_image, "too_large": too_large}


@pytest.fixture
def page(site):
    """The page, freshly loaded; after the test, the browser's console must hold no unexpected error."""
    page = Page(site["driver"], site["url"])
    page.console_errors()  # drop what earlier tests left
    yield page
    assert page.console_errors() == []


def image(site, i: int = 3) -> Path:
    return Path(site["index"].paths[i])


def hits_shown(page: Page) -> list[tuple[str, str, str]]:
    """(name, score, thumbnail src) of each result figure, in page order."""
    return [(f.find_element("css selector", ".name").text, f.find_element("css selector", ".score").text,
             f.find_element("css selector", "img").get_attribute("src")) for f in page.all("#results figure.hit")]


def expected_hits(site, hits) -> list[tuple[str, str, str]]:
    ids = {path: i for i, path in enumerate(site["index"].paths)}
    return [(Path(h.path).name, f"{h.score:.3f}", f"{site['url']}/thumb/{ids[h.path]}") for h in hits]


def test_tabs_show_one_panel_each_and_follow_the_url(page):
    page.open("/#segment")
    assert [page.find(f"#{n}-section").is_displayed() for n in ("search", "classify", "segment")] == [0, 0, 1]
    for name in ("search", "classify", "segment"):
        page.tab(name)
        shown = [n for n in ("search", "classify", "segment") if page.find(f"#{n}-section").is_displayed()]
        assert shown == [name] and page.js("return location.hash") == f"#{name}"
        assert page.find(f"#tab-{name}").get_attribute("aria-selected") == "true"
    assert "10 indexed images" in page.text("status")


def test_text_search_shows_thumbnails_in_the_library_order(site, page):
    page.open()
    page.fill("#search-query", "a red circle")
    page.fill("#search-k", "4")
    page.submit("search-form")
    page.wait_for("4 results", lambda: len(page.all("#results figure.hit")) == 4)
    page.wait_for("the thumbnails", lambda: page.images_loaded("#results img"))
    expected = search_text(site["index"], site["model"], "a red circle", 4)[0]
    assert hits_shown(page) == expected_hits(site, expected)
    assert page.js("return [...document.querySelectorAll('#results img')].map((i) => i.naturalWidth)") == [64] * 4
    assert page.text("search-message") == "4 best matches for “a red circle”"
    assert "q=a+red+circle&k=4" in page.js("return location.search")  # the URL names the search


def test_results_show_captions_and_the_status_what_the_model_learned_from(site, page):
    page.open("/?q=a+green+square&k=3")
    page.wait_for("3 results", lambda: len(page.all("#results figure.hit")) == 3)
    hits = search_text(site["index"], site["model"], "a green square", 3)[0]
    captions = [f.find_element("css selector", ".caption").text for f in page.all("#results figure.hit")]
    assert captions == [h.metadata["caption"] for h in hits]
    assert "trained on train/captions.csv (30 steps, objective clip)" in page.text("status")


def test_a_search_url_runs_its_search_on_load(site, page):
    page.open("/?q=a+blue+square&k=3")
    page.wait_for("3 results", lambda: len(page.all("#results figure.hit")) == 3)
    expected = search_text(site["index"], site["model"], "a blue square", 3)[0]
    assert hits_shown(page) == expected_hits(site, expected)


def test_search_by_an_uploaded_image_finds_it_first(site, page):
    page.open()
    page.fill("#search-k", "5")
    page.choose_file("#search-image", image(site))
    page.submit("image-search-form")
    page.wait_for("5 results", lambda: len(page.all("#results figure.hit")) == 5)
    page.wait_for("the thumbnails", lambda: page.images_loaded("#results img"))
    shown = hits_shown(page)
    expected = search_image(site["index"], site["model"], Image.open(image(site)).convert("RGB"), 5)
    assert shown == expected_hits(site, expected)
    assert shown[0][0] == image(site).name and shown[0][1] == "1.000"
    assert page.text("search-message") == f"5 best matches for the example image {image(site).name}"


def bar_fraction(page: Page, row) -> float:
    """How much of its cell a row's bar fills, as the browser laid it out."""
    return page.js("const bar = arguments[0].querySelector('.bar'), cell = bar.parentElement;"
                   "return bar.getBoundingClientRect().width / parseFloat(getComputedStyle(cell).width);", row)


def test_classify_draws_a_bar_chart_of_the_probabilities(site, page):
    labels = ["red circle", "blue square", "green triangle", "yellow star"]
    page.open("/#classify")
    page.choose_file("#classify-image", image(site))
    page.fill("#classify-labels", ", ".join(labels))
    page.find(f"#classify-templates option[value='{TEMPLATE}']").click()
    page.submit("classify-form")
    page.wait_for("4 bars", lambda: len(page.all("#classify-results tr")) == 4)
    page.wait_for("the preview", lambda: page.images_loaded("#classify-preview"))
    expected = site["service"].classify(Image.open(image(site)).convert("RGB"), labels, [TEMPLATE])
    rows = page.all("#classify-results tr")
    assert [r.find_element("css selector", ".label").text for r in rows] == [p["label"] for p in expected]
    for row, prediction in zip(rows, expected):
        p = prediction["probability"]
        assert row.find_element("css selector", ".value").text == f"{100 * p:.1f} %"
        assert bar_fraction(page, row) == pytest.approx(p, abs=0.01)
    assert page.text("classify-message") == "4 labels, 1 prompt templates each"


def css_color(hex_color: str) -> str:
    """'#rrggbb' as selenium reports a computed colour."""
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, 1)"


def test_segment_shows_the_overlay_and_a_legend(site, page):
    labels = ["background", "circle", "square", "red"]
    page.open("/#segment")
    page.choose_file("#segment-image", image(site))
    page.fill("#segment-labels", ",".join(labels))
    page.find("#segment-method option[value='maskclip']").click()
    page.submit("segment-form")
    page.wait_for("the overlay", lambda: page.find("#segment-result").is_displayed()
                  and page.images_loaded("#segment-overlay"))
    expected = site["service"].segment(Image.open(image(site)).convert("RGB"), labels, method="maskclip")
    assert page.find("#segment-overlay").get_attribute("src") == expected["overlay"]  # the server's picture
    assert page.js("const i = document.getElementById('segment-overlay'); return [i.naturalWidth, i.naturalHeight]"
                   ) == [256, 256]  # 64 px enlarged to be readable
    rows = page.all("#segment-legend tr")
    names = [r.find_element("css selector", ".label").text for r in rows]
    assert sorted(names) == sorted(labels)  # every label, present or not (no pixel is left unassigned here)
    colors = dict(zip(labels, class_colors(labels)))
    for row, name in zip(rows, names):
        share = expected["fractions"][name]
        assert row.find_element("css selector", ".value").text == f"{100 * share:.1f} %"
        swatch = row.find_element("css selector", ".swatch").value_of_css_property("background-color")
        assert expected["colors"][name] == "#{:02x}{:02x}{:02x}".format(*colors[name])  # the overlay's colour
        assert swatch == css_color(expected["colors"][name])
    shares = [expected["fractions"][n] for n in names]
    assert shares == sorted(shares, reverse=True)
    assert re.fullmatch(r"method maskclip, 64×64 pixels", page.text("segment-message"))


def test_unassigned_pixels_get_a_legend_row_without_a_colour(site, page):
    page.open("/#segment")
    page.choose_file("#segment-image", image(site))
    page.fill("#segment-labels", "circle, square")
    page.fill("#segment-form input[name=background_threshold]", "2")  # no cosine reaches 2: no pixel is assigned
    page.submit("segment-form")
    page.wait_for("the legend", lambda: page.find("#segment-result").is_displayed())
    rows = [[cell.text for cell in r.find_elements("css selector", "td")] for r in page.all("#segment-legend tr")]
    assert rows == [["", "circle", "", "0.0 %"], ["", "square", "", "0.0 %"],
                    ["", "(unassigned, not tinted)", "", "100.0 %"]]
    assert page.find("#segment-legend tr:last-child .swatch").get_attribute("class") == "swatch none"


@pytest.mark.parametrize("tab, file_input, fields, form, message_id, result", [
    ("search", "#search-image", {}, "image-search-form", "search-message", "#results figure.hit"),
    ("classify", "#classify-image", {"#classify-labels": "cat, dog"}, "classify-form", "classify-message",
     "#classify-result"),
    ("segment", "#segment-image", {"#segment-labels": "cat, dog"}, "segment-form", "segment-message",
     "#segment-result"),
])
def test_a_bad_upload_shows_the_servers_message_and_hides_the_old_result(site, page, tab, file_input, fields, form,
                                                                          message_id, result):
    page.open(f"/#{tab}")
    for selector, value in fields.items():
        page.fill(selector, value)
    page.choose_file(file_input, image(site))
    page.submit(form)
    page.wait_for("a first result", lambda: page.find(result).is_displayed())
    page.choose_file(file_input, site["not_an_image"])
    page.submit(form)
    text = page.wait_for_error(message_id)
    assert text.startswith("Error: upload 'notes.txt'") and "not an image" in text, text
    assert not page.find(result).is_displayed()
    assert page.find(f"#{form}").is_displayed() and page.find(f"#{form} button").is_enabled()  # ready to try again
    page.choose_file(file_input, site["too_large"])
    page.submit(form)
    page.wait_for("the size error", lambda: "larger than the server's limit" in page.text(message_id))
    assert page.text(message_id) == "Error: the upload is larger than the server's limit of 0.25 MB"


def test_without_an_index_the_search_tab_says_how_to_get_one(site):
    page = Page(site["driver"], site["bare_url"]).open()
    assert page.text("search-message") == "No image index loaded: start the server with --index IDX to search."
    assert not page.find("#search-query").is_enabled() and not page.find("#search-form button").is_enabled()
    page.tab("classify")
    assert page.find("#classify-form button").is_enabled()
