import json

from clip_pacl.cli.main import main
from clip_pacl.demo import format_summary


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clip_train"]["steps"] == 4 and summary["pacl_train"]["steps"] == 4
    assert set(summary["segmentation"]) == {"segmentation_colors", "segmentation"}
    for per_method in summary["segmentation"].values():
        assert set(per_method) == {"patch", "maskclip", "pacl"}
        for result in per_method.values():
            assert [r["background_threshold"] for r in result["sweep"]] == [None, 0.2, 0.3, 0.4, 0.5]
            assert result["best"]["miou"] == max(r["miou"] for r in result["sweep"])
    assert "by colour: raw patches" in format_summary(summary)
    for task in ("shapes", "colors"):
        assert 0.0 <= summary["zeroshot"][task]["top1"] <= 1.0
    assert (out / "pacl_overlay.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["segmentation"] == summary["segmentation"]


def test_demo_rejects_bad_steps(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--clip-steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
