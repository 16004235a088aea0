"""Screenshots of the web page's tabs for the README, taken in a real headless chromium as the browser tests drive it.

    python docs/make_screenshots.py [--model M] [--out docs/screenshots] [--background-threshold F]

Serves `--model` (default: a random `tiny` CLIP, seed 0) with an index of 24 built-in synthetic images (seed 1,
at the model's image size) on 127.0.0.1, then fills in each tab and saves the whole page:
search.png (text search), upload.png (search by an example image), classify.png (the colour of a
one-object image), segment.png (its colours, background included) and error.png (a text file sent to classify).
Needs selenium and Debian's chromium + chromium-driver, as tests/test_web_browser.py does. PNGs are
palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the browser and server helpers the tests use

import clip_pacl  # noqa: E402
from browser import CHROMEDRIVER, CHROMIUM, Page, chromium, find_program  # noqa: E402
from clip_pacl.data import read_label_rows  # noqa: E402
from clip_pacl.data.synthetic import COLORS, generate_synthetic  # noqa: E402
from clip_pacl.retrieval import build_index, image_paths  # noqa: E402
from clip_pacl_app.web import WebService, create_app  # noqa: E402
from webserver import running  # noqa: E402

QUERY = "a photo of a red circle"
COLOR_LABELS = list(COLORS)


def save_small(page: Page, path: Path) -> None:
    """The page as a palette PNG (UI colours and small thumbnails survive 256 colours without dithering)."""
    page.screenshot(path)
    Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


def take(page: Page, out: Path, example: Path, text_file: Path, threshold: float | None) -> None:
    """Fill in every tab and save one screenshot of each."""
    page.open()
    page.fill("#search-query", QUERY)
    page.fill("#search-k", "8")
    page.submit("search-form")
    page.wait_for("the search results", lambda: len(page.all("#results figure.hit")) == 8
                  and page.images_loaded("#results img"))
    save_small(page, out / "search.png")

    page.open()
    page.fill("#search-k", "8")
    page.choose_file("#search-image", example)
    page.submit("image-search-form")
    page.wait_for("the search results", lambda: "example image" in page.text("search-message")
                  and page.images_loaded("#results img"))
    save_small(page, out / "upload.png")

    page.open("/#classify")
    page.choose_file("#classify-image", example)
    page.fill("#classify-labels", ", ".join(COLOR_LABELS))
    page.find("#classify-templates option[value='simple']").click()
    page.submit("classify-form")
    page.wait_for("the bar chart", lambda: page.find("#classify-result").is_displayed()
                  and page.images_loaded("#classify-preview"))
    save_small(page, out / "classify.png")

    page.open("/#segment")
    page.choose_file("#segment-image", example)
    page.fill("#segment-labels", ", ".join(["background", *COLOR_LABELS]))
    if threshold is not None:
        page.fill("#segment-form input[name=background_threshold]", str(threshold))
    page.submit("segment-form")
    page.wait_for("the overlay", lambda: page.find("#segment-result").is_displayed()
                  and page.images_loaded("#segment-overlay"))
    save_small(page, out / "segment.png")

    page.open("/#classify")
    page.choose_file("#classify-image", text_file)
    page.fill("#classify-labels", "cat, dog")
    page.submit("classify-form")
    page.wait_for_error("classify-message")
    save_small(page, out / "error.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a CLIP or PACL (checkpoint or run dir, preset, ...); "
                                                      "default: a random 'tiny' CLIP")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="folder for the PNGs")
    parser.add_argument("--background-threshold", type=float, default=None,
                        help="the segment tab's background threshold (default: none, background by its prompt)")
    args = parser.parse_args()
    browser, driver = find_program(CHROMIUM), find_program(CHROMEDRIVER)
    if not (browser and driver):
        parser.error("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    torch.manual_seed(0)
    model = clip_pacl.load(args.model or "tiny").eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        generate_synthetic(data, n=24, seed=1, image_size=model.image_size)
        index, _ = build_index(model, image_paths(data / "images"), batch_size=24, progress=False)
        example = read_label_rows(data / "colors.csv")[0].image  # an image with one object
        text_file = Path(tmp) / "notes.txt"
        text_file.write_text("not a picture\n")
        service = WebService(model, index, Path(args.model).name if args.model else "tiny (random)", "synthetic")
        args.out.mkdir(parents=True, exist_ok=True)
        with running(create_app(service)) as url, chromium(browser, driver, width=1000, height=600) as chrome:
            take(Page(chrome, url), args.out, example, text_file, args.background_threshold)


if __name__ == "__main__":
    main()
