"""The performance benchmark scripts the README quotes run end to end, tiny settings, and write the JSONL they promise
(no timing is asserted: only that every field the README reads is there and sane)."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import require

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_step_benchmark_steps_and_memory(tmp_path):
    require("open_clip")
    out = tmp_path / "train_step.jsonl"
    stdout = _run("train_step.py", "--modes", "step,rss", "--configs", "tiny:4:64", "--steps", "1", "--warmup", "0",
                  "--threads", "1", "--out", out)
    rows = _rows(out)
    steps = {r["library"]: r for r in rows if r["mode"] == "step"}
    assert set(steps) == {"clip_pacl", "open_clip"} and steps["open_clip"]["speedup_vs_open_clip"] == 1.0
    assert all(r["steps_per_s"] > 0 and r["preset"] == "tiny" and r["cpu"] for r in steps.values())
    memory = {r["library"]: r for r in rows if r["mode"] == "rss"}
    assert set(memory) == {"clip_pacl", "open_clip"}
    assert all(r["peak_rss_mb"] > r["rss_after_import_mb"] > 0 for r in memory.values())
    assert "vs open_clip" in stdout and "peak" in stdout


def test_dataload_benchmark_compares_loader_and_step(tmp_path):
    out = tmp_path / "dataload.jsonl"
    stdout = _run("dataload.py", "--n", "16", "--batch-size", "8", "--workers", "0", "1", "--repeats", "1",
                  "--threads", "1", "--out", out)
    rows = _rows(out)
    assert [r["workers"] for r in rows] == [0, 1]
    for r in rows:
        assert r["images"] == 16 and r["image_size"] == 64 and r["model"] == "tiny"
        assert min(r["loader_images_per_s"], r["step_images_per_s"], r["loop_images_per_s"]) > 0
        assert r["loader_keeps_up"] == (r["loader_images_per_s"] >= r["step_images_per_s"])
    assert "keeps up" in stdout


def test_int8_accuracy_benchmark(tmp_path):
    out = tmp_path / "int8.jsonl"
    stdout = _run("int8_accuracy.py", "--workdir", tmp_path / "work", "--n", "24", "--heldout", "12", "--steps", "2",
                  "--batch-size", "8", "--threads", "1", "--out", out)
    rows = {r["metric"]: r for r in _rows(out)}
    assert {"zeroshot_shapes_top1", "zeroshot_colors_top1", "text_to_image_R@1"} <= set(rows)
    assert all(0 <= rows[k]["int8"] <= 1 and 0 <= rows[k]["fp32"] <= 1 for k in ("zeroshot_colors_top1",
                                                                              "image_to_text_R@5"))
    assert rows["image_cosine_min (random weights)"]["int8"] >= 0.99
    assert rows["text_cosine_min (trained weights)"]["int8"] >= 0.99
    assert "diff (points)" in stdout
