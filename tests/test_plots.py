"""`--plots`: the zero-shot confusion matrix and the retrieval grid are written as real PNGs of plausible size."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.eval.plots import confusion_matrix
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, 10, seed=0, image_size=64, max_objects=1)
    return out


def _check_png(path: Path, min_side: int) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= min_side and image.getextrema() != ((255, 255),) * 3  # drawn on, not blank
        assert len(image.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 20


def test_confusion_counts():
    counts = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]  # row: true class, column: predicted


def test_zeroshot_plots_confusion_matrix(synthetic, tmp_path, capsys):
    args = ["eval", "zeroshot", "--model", "tiny", "--random-weights",
            "--data", str(synthetic / "colors.csv"), "--templates", "simple",
            "--plots", str(tmp_path / "plots")]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plots"] == [str(tmp_path / "plots" / "confusion_matrix.png")]
    _check_png(tmp_path / "plots" / "confusion_matrix.png", 300)
    assert main(args) == 0 and "plot: " in capsys.readouterr().out


def test_retrieval_plots_query_grid(synthetic, tmp_path, capsys):
    assert main(["eval", "retrieval", "--model", "tiny", "--random-weights",
                 "--data", str(synthetic / "captions.csv"), "--plots",
                 str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    grid = tmp_path / "retrieval_grid.png"
    assert result["plots"] == [str(grid)]
    _check_png(grid, 600)  # 8 query rows of 2 inches at 100 dpi
    with Image.open(grid) as image:
        assert image.size[0] >= 1100  # the query column and 5 images
