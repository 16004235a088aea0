"""`clip-pacl demo`: the quick run writes the whole report (HTML self-contained, Markdown with its PNGs), the
commands it prints work, and an existing output directory is replaced only when asked, and only if it is a demo's."""

import base64
import html
import io
import json
import re
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import clip_pacl
from clip_pacl import device
from clip_pacl.data.synthetic import BACKGROUNDS, COLORS, SHAPES, SIZES, ShapeObject, caption_templates
from clip_pacl.device import resolve_precision
from clip_pacl.errors import ConfigError
from clip_pacl.retrieval import ImageIndex
from clip_pacl.retrieval.search import search_encoder
from clip_pacl.tokenizer import tokenize
from clip_pacl_app.cli.main import build_parser, main
from clip_pacl_app.demo import SECTIONS, DemoConfig, format_summary, metric_rows, prepare_out_dir
from clip_pacl_app.demo.pipeline import MARKER

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(quick_demo) -> tuple[Path, dict]:
    """`clip-pacl demo --quick --no-progress --json` (conftest.py: shared with tests/test_readme.py)."""
    return quick_demo


def test_quick_demo_runs_every_phase(demo):
    out, summary = demo
    assert summary["clip_train"]["steps"] == 4 and summary["pacl_train"]["steps"] == 4
    assert set(summary["phases"]) == {"data", "clip_train", "clip_eval", "pacl_train", "segmentation", "report"}
    assert set(summary["segmentation"]) == {"segmentation_colors", "segmentation"}
    for per_method in summary["segmentation"].values():
        assert set(per_method) == {"patch", "maskclip", "pacl"}
        for result in per_method.values():
            assert [r["background_threshold"] for r in result["sweep"]] == [None, 0.2, 0.3, 0.4, 0.5]
            assert result["best"]["miou"] == max(r["miou"] for r in result["sweep"])
    for task in ("shapes", "colors"):
        assert 0.0 <= summary["zeroshot"][task]["top1"] <= 1.0
    scores = summary["clip_score"]
    assert scores["n_images"] == 24 and 0 <= scores["mismatched"] <= 2.5 and 0 <= scores["matched"] <= 2.5
    assert (out / "pacl_overlay.png").read_bytes()[:8] == PNG
    assert json.loads((out / "summary.json").read_text())["segmentation"] == summary["segmentation"]
    assert summary["config"]["precision"] == "auto" and summary["precision"] == resolve_precision("auto", "cpu")


def test_auto_precision_runs_bf16_where_the_cpu_has_bf16_units(tmp_path, capsys, monkeypatch):
    """With the flags of a CPU with AVX-512 BF16, the default demo trains and evaluates at bf16 and says so in its
    printed summary, summary.json and both reports; bf16 runs (slowly) wherever PyTorch has CPU bf16 kernels."""
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--clip-steps", "2", "--pacl-steps", "1"]) == 0
    assert capsys.readouterr().out.startswith("precision bf16, 2 CLIP + 1 PACL training steps\n")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["clip_train"]["steps"] == 2
    for run in ("clip", "pacl"):
        assert json.loads((out / run / "train_config.json").read_text())["precision"] == "bf16"
    row = ("precision", "bf16", "auto: bfloat16 matrix units (AMX or AVX-512 BF16 on the CPU, or a bf16 GPU) found")
    assert row in metric_rows(summary) and f"| {' | '.join(row)} |" in (out / "report.md").read_text()
    assert "at bf16 precision" in (out / "report.html").read_text()


def _rows_in_report(summary: dict) -> list[tuple[str, str, str]]:
    """The metric rows the report holds: all but the time of writing it, and the total, taken just before."""
    return [row for row in metric_rows(summary) if row[0] not in ("time: writing the report", "time: total")]


class _Attributes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_report_is_complete_and_self_contained(demo):
    out, summary = demo
    text = (out / "report.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{html.escape(section)}</h2>" in text
    parser = _Attributes()
    parser.feed(text)
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 7  # 2 loss curves, 2 confusion matrices, retrieval grid, segmentation figure, overlay
    for tag, attrs in parser.tags:
        assert "href" not in attrs and tag not in ("link", "script", "iframe")
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/png;base64,")
            png = base64.b64decode(attrs["src"].split(",", 1)[1])
            assert png[:8] == PNG
            with Image.open(io.BytesIO(png)) as image:
                image.verify()
    without_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", text)
    assert "url(" not in without_data and "http" not in without_data.lower()
    for name, value, comparison in _rows_in_report(summary):
        name, value, comparison = (html.escape(x) for x in (name, value, comparison))
        assert f"<td>{name}</td><td class=num>{value}</td><td>{comparison}</td>" in text


def test_markdown_report_links_its_figures(demo):
    out, summary = demo
    text = (out / "report.md").read_text()
    for section in SECTIONS:
        assert f"\n## {section}\n" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 7
    for link in links:
        assert not Path(link).is_absolute() and (out / link).read_bytes()[:8] == PNG
    for name, value, comparison in _rows_in_report(summary):
        assert f"| {name} | {value} | {comparison} |" in text
    assert "| time: total |" in text
    assert "CLIPScore" in text and f"{summary['clip_score']['matched']:.3f}" in text


def test_printed_summary_has_table_report_and_commands(demo):
    out, summary = demo
    printed = format_summary(summary)
    assert printed.startswith(f"precision {summary['precision']}, 4 CLIP + 4 PACL training steps\n")
    for name, value, _ in metric_rows(summary):
        assert re.search(rf"{re.escape(name)}\s+{re.escape(value)}", printed)
    assert f"report: {out / 'report.html'}" in printed
    assert f"clip-pacl serve --model {out / 'pacl'} --index {out / 'index'}" in printed
    assert "time: writing the report" in printed and "time: total" in printed


def test_printed_commands_run(demo, tmp_path, capsys):
    """Every command the demo suggests parses, and the search, segment and both training commands run as printed
    (training on the demo's own CSV in place of YOUR.csv)."""
    out, summary = demo
    commands = {step["what"]: shlex.split(step["command"]) for step in summary["next_steps"]}
    for argv in commands.values():
        assert argv[0] == "clip-pacl"
        build_parser().parse_args(argv[1:])
    serve, search, segment, finetune, train_clip, train_pacl = commands.values()
    assert serve[1] == "serve"
    pacl = clip_pacl.load(serve[serve.index("--model") + 1])  # the page's PACL searches with the CLIP that indexed
    assert search_encoder(ImageIndex.load(serve[serve.index("--index") + 1]), pacl) is pacl.clip
    assert main([*search[1:], "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 5
    segment = [str(tmp_path / a) if a in ("mask.png", "overlay.png") else a for a in segment]
    assert main(segment[1:]) == 0 and (tmp_path / "overlay.png").read_bytes()[:8] == PNG
    with Image.open(tmp_path / "overlay.png") as drawn, Image.open(out / "pacl_overlay.png") as shown:
        assert drawn.size == shown.size and drawn.tobytes() == shown.tobytes()  # the report's overlay is this one
    csv = str(out / "data" / "train" / "captions.csv")
    assert finetune[finetune.index("--epochs") + 1] == "10"
    for argv, shorter in ((finetune, ["--epochs", "1"]), (train_clip, []), (train_pacl, [])):  # (the fine-tune's
        argv = [csv if a == "YOUR.csv" else str(tmp_path / a) if a.startswith("runs/") else a for a in argv]  # 10
        assert main([*argv[1:], *shorter, "--no-progress"]) == 0  # passes would be 80 steps of this CSV)
    assert (tmp_path / "runs" / "pacl" / "final").is_dir() and (tmp_path / "runs" / "clip-finetune" / "final").is_dir()


def test_rerun_into_existing_dir_needs_overwrite(demo, capsys):
    out, _ = demo
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize("contents", [{"notes.txt": "mine"}, {"data/x.csv": "mine"}])
def test_overwrite_refuses_a_directory_that_is_not_a_demo(tmp_path, capsys, contents):
    for name, text in contents.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    if "notes.txt" in contents:
        (tmp_path / MARKER).write_text("")  # even a marked directory keeps files the demo did not write
    assert main(["demo", "--quick", "--overwrite", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --overwrite replaces only a demo's own output") and err.count("\n") == 1
    for name, text in contents.items():
        assert (tmp_path / name).read_text() == text


def test_overwrite_empties_an_earlier_demo_dir(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "clip" / "final").mkdir(parents=True)
    (out / MARKER).write_text("")
    (out / "clip" / "final" / "model.safetensors").write_bytes(b"old")
    (out / "report.html").write_text("old")
    (out / "figures").symlink_to(elsewhere)  # a link is removed, not followed
    prepare_out_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    assert (elsewhere / "keep.txt").read_text() == "mine"
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_out_dir(out, overwrite=False)


def test_demo_needs_matplotlib_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    assert main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 2
    assert "matplotlib" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_demo_rejects_bad_steps(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--clip-steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_demo_context_holds_every_synthetic_caption():
    """The demo's CLIP reads 32 tokens, not 77: the longest caption the generator can write must fit. BPE splits
    words apart, so the longest caption takes the longest colour, shape and size words, spread along the top row
    (relations "to the left of", the corner positions)."""
    def tokens(text: str) -> int:
        return int((tokenize([text]) != 0).sum())

    color, shape, size = (max(names, key=tokens) for names in (COLORS, SHAPES, SIZES))
    longest = max(tokens(caption) for background in BACKGROUNDS for n in (1, 2, 3)
                  for caption in caption_templates(
                      [ShapeObject(shape, color, size, (5.0 + 27 * i, 5.0), 4.0, (0, 0, 0)) for i in range(n)],
                      background, 64))
    assert 20 < longest <= DemoConfig().context_length


def test_demo_time_benchmark_records_phases_and_metrics(tmp_path):
    out = tmp_path / "demo_time.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_time.py"), "--quick", "--threads", "1",
                           "--out", str(out), "--label", "test"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["mode"] == "quick" and record["threads"] == 1 and record["label"] == "test"
    assert record["clip_steps"] == 4 and record["wall_s"] >= record["demo_s"] > 0
    assert set(record["phases"]) == {"data", "clip_train", "clip_eval", "pacl_train", "segmentation", "report"}
    assert 0 <= record["metrics"]["miou_colour_pacl"] <= 1 and len(record["loadavg_before"]) == 3
    assert proc.stdout.startswith("phase") and "clip_train" in proc.stdout and "\ntotal" in proc.stdout


def test_report_times_stay_on_one_line_and_figures_name_their_background_rule(demo):
    out, summary = demo
    text = (out / "report.html").read_text()
    assert "tr.time td{white-space:nowrap}" in text and "td.num{" in text and "white-space:nowrap}" in text
    times = [name for name, _, _ in _rows_in_report(summary) if name.startswith("time:")]
    assert times and all(f"<tr class=time><td>{html.escape(name)}</td>" in text for name in times)
    rule = summary["segmentation"]["segmentation_colors"]["pacl"]["auto"]["background"]
    assert rule == summary["overlay_background"] == "zscore"
    assert f"PACL, each with its label-free background rule ({rule})" in text
    assert "drawn by the `clip-pacl segment --overlay` command under Go further" in text


def test_the_loss_plot_legend_is_off_the_curves():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clip_pacl.train.logging import loss_figure

    train = [{"step": s, "loss": 5.0 - s / 200} for s in range(1, 600, 10)]
    val = [{"step": s, "val_text_to_image_R@1": s / 1000} for s in (100, 300, 550)]
    for v in (val, []):
        fig = loss_figure(plt, train, v)
        fig.canvas.draw()
        legend = fig.axes[0].get_legend()
        assert len(legend.get_texts()) == (2 if v else 1)
        assert not legend.get_window_extent().overlaps(fig.axes[0].get_window_extent())
        plt.close(fig)


def test_demo_help_states_the_step_counts_the_demo_runs(capsys):
    """`--clip-steps` / `--pacl-steps` help says the defaults DemoConfig holds."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    quick = DemoConfig.quick("q")
    assert f"CLIP training steps (default {DemoConfig.clip_steps}; --quick: {quick.clip_steps})" in text
    assert f"PACL training steps (default {DemoConfig.pacl_steps}; --quick: {quick.pacl_steps})" in text
