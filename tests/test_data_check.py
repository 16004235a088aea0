"""`clip-pacl data check` finds unreadable images before a training run does."""

import json

from PIL import Image

from clip_pacl.data.check import check_caption_data
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl_app.cli.main import main


def test_report_counts_rows_images_and_problems(tmp_path):
    generate_synthetic(tmp_path, n=6, seed=0, captions_per_image=2)
    (tmp_path / "images" / "000002.png").write_bytes(b"broken")
    (tmp_path / "images" / "000004.png").unlink()
    report = check_caption_data(tmp_path / "captions.csv", threads=2)
    assert (report.format, report.rows, report.images, report.bad_images) == ("csv", 12, 6, 2)
    assert report.captions_per_image == 2.0 and report.mean_caption_words > 2
    assert any("000002.png is not an image file" in p for p in report.problems)
    assert any("000004.png does not exist" in p for p in report.problems)
    sampled = check_caption_data(tmp_path, limit=3)  # the folder resolves to its captions.csv
    assert sampled.images == 3 and sampled.rows == 12


def test_cli_exit_codes_and_json(tmp_path, capsys):
    generate_synthetic(tmp_path, n=4, seed=1)
    assert main(["data", "check", str(tmp_path / "captions.csv"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 4 and result["bad_images"] == 0 and result["bad_fraction"] == 0
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "000001.png")  # still fine
    (tmp_path / "images" / "000003.png").write_bytes(b"")
    assert main(["data", "check", str(tmp_path / "captions.csv")]) == 1
    assert "1 unreadable (25.00%)" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "captions.csv"), "--max-bad-fraction", "0.3"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "captions.csv"), "--caption-key", "text"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: captions.csv has no column 'text' (columns: image, caption); use --caption-key"
