"""The performance benchmark scripts the README quotes run end to end, tiny settings, and write the JSONL they promise
(no timing is asserted: only that every field the README reads is there and sane)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_pacl
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
    for r in steps.values():  # the GPU script's fields: samples/s, MFU against the peak measured in the same run
        assert r["device"] == "cpu" and r["amp"] == "none" and r["compile"] is None and r["threads"] == 1
        assert r["samples_per_s"] == pytest.approx(4 * r["steps_per_s"], rel=0.01)
        assert r["peak_dtype"] == "float32" and r["peak_gflop_s"] >= r["peak_mm_gflop_s"] > 0
        assert r["mfu_pct"] > 0 and r["warmup_excess_s"] == 0  # --warmup 0: no warm-up steps
        assert r["mfu_pct"] == pytest.approx(100 * r["achieved_gflop_s"] / r["peak_gflop_s"], rel=0.01)
    # one sample's forward (both towers, 77 tokens) counted on the model, x3: the same for both libraries
    assert steps["clip_pacl"]["train_flops_per_sample"] == steps["open_clip"]["train_flops_per_sample"] > 1e8
    memory = {r["library"]: r for r in rows if r["mode"] == "rss"}
    assert set(memory) == {"clip_pacl", "open_clip"}
    assert all(r["peak_rss_mb"] > r["rss_after_import_mb"] > 0 for r in memory.values())
    assert "vs open_clip" in stdout and "peak" in stdout and "MFU" in stdout
    summary = _run("gpu_summary.py", "--train", out)
    assert "| train tiny b4 64px (amp none, compile off) |" in summary and ">= 1.3x" in summary


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


def test_encode_and_pacl_loss_benchmarks_feed_the_gpu_summary(tmp_path):
    """The CPU side of benchmarks/gpu.sh's encode and PACL-loss steps at tiny sizes, and its summary of them."""
    require("open_clip")
    encode, pacl = tmp_path / "encode.jsonl", tmp_path / "pacl.jsonl"
    stdout = _run("encode.py", "--device", "cpu", "--amp", "bf16", "--models", "tiny", "--towers", "image,text",
                  "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", encode,
                  "--peak-size", "256")  # bf16 peak at 2048: > 5 CPU-minutes here, the suite's load-sensitive timeout
    rows = {r["tower"]: r for r in _rows(encode)}
    assert set(rows) == {"image", "text"} and all(r["amp"] == "bf16" and r["device"] == "cpu" for r in rows.values())
    assert rows["image"]["peak_dtype"] == "bfloat16" and rows["image"]["ours_pct_of_bf16_peak"] > 0
    assert all(0 < r["max_abs_diff"] < 0.1 for r in rows.values())  # bf16 on one side or both, same weights
    assert "(bfloat16)" in stdout
    stdout = _run("pacl_loss.py", "--device", "cpu", "--batch", "8", "--patches", "4", "--dim", "16", "--repeats", "1",
                  "--loop-max-batch", "4", "--out", pacl)
    rows = {r["impl"]: r for r in _rows(pacl)}
    assert rows["exact"]["loss"] == pytest.approx(rows["materialised"]["loss"], rel=1e-5)
    assert all(rows[k]["seconds_fwd_bwd"] > 0 and rows[k]["memory"] == "peak_rss" and rows[k]["device"] == "cpu"
               and rows[k]["threads"] >= 1 and rows[k]["torch"] for k in ("exact", "materialised"))
    assert "skipped" in rows["loop"] and "time/exact" in stdout
    summary = _run("gpu_summary.py", "--encode", encode, "--pacl", pacl, "--train", tmp_path / "missing.jsonl")
    assert "| encode tiny image b2 (amp bf16) |" in summary and "| encode tiny text b2 (amp bf16) |" in summary
    assert "| PACL loss B=8 N=4 D=16 (fwd+bwd) |" in summary and "train" not in summary.split("|---|")[1]


def test_gpu_only_and_cpu_only_options_fail_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8_accuracy.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: int8_accuracy.py is CPU only: PyTorch's dynamic int8 kernels (fbgemm, qnnpack) have no CUDA "
        "implementation"]
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pacl_loss.py"), "--device", "cuda"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
        assert proc.stderr.startswith("error: --device cuda, but torch")


def test_encode_benchmark_times_bf16_towers_against_fp32(tmp_path):
    """`encode.py --bf16`: the bf16 contender (`--precision bf16`) in the same rotation, with its ratios and cosine."""
    require("open_clip")
    out = tmp_path / "encode.jsonl"
    stdout = _run("encode.py", "--bf16", "--models", "tiny", "--towers", "image,text", "--batch", "2", "--repeats", "1",
                  "--warmup", "0", "--threads", "1", "--out", out)
    rows = {r["tower"]: r for r in _rows(out)}
    assert set(rows) == {"image", "text"}
    for r in rows.values():
        assert r["bf16_per_s"] > 0 and r["bf16_vs_fp32"] > 0 and r["bf16_vs_open_clip"] > 0
        assert 0.99 <= r["bf16_cosine_min"] <= 1.0
        assert "cpu_flags" in r and "load_avg_1m" in r
        assert min(r["ours_wall_s"], r["ours_cpu_s"], r["open_clip_wall_s"], r["open_clip_cpu_s"]) > 0
    image = rows["image"]  # GFLOP per CPU second against the peak's own, as a shared machine stretches both less
    assert image["peak_gflop_per_cpu_s"] > 0 and image["ours_gflop_per_cpu_s"] > 0
    assert image["ours_pct_of_cpu_peak"] == pytest.approx(
        100 * image["ours_gflop_per_cpu_s"] / image["peak_gflop_per_cpu_s"], rel=0.05, abs=0.2)
    assert "bf16:" in stdout


def test_linear_kernels_benchmark_times_each_kernel_on_the_block_shapes(tmp_path):
    """`linear_kernels.py`: every kernel on each of a block's four linear layers (and their sum) for both towers, the
    outputs equal to `F.linear`'s within the fast path's tolerance; a ResNet has no image block."""
    out = tmp_path / "kernels.jsonl"
    stdout = _run("linear_kernels.py", "--model", "tiny", "--batch", "2", "--text-tokens", "5", "--repeats", "1",
                  "--warmup", "0", "--out", out)
    rows = _rows(out)
    kernels = {r["kernel"] for r in rows}
    assert {"mkl", "onednn", "onednn_packed"} <= kernels
    config = clip_pacl.CLIPConfig.from_name("tiny")
    expected_rows = {"image": 2 * (config.vision.grid_size**2 + 1), "text": 2 * 5}
    assert {(r["tower"], r["rows"]) for r in rows} == set(expected_rows.items())
    for tower in expected_rows:
        for kernel in kernels:
            layers = {r["layer"]: r for r in rows if r["tower"] == tower and r["kernel"] == kernel}
            assert set(layers) == {"qkv", "out", "fc1", "fc2", "block"}
            assert layers["block"]["cpu_ms"] == pytest.approx(sum(layers[k]["cpu_ms"] for k in
                                                                  ("qkv", "out", "fc1", "fc2")), abs=0.01)
    assert all(r["max_abs_diff_vs_mkl"] < 1e-5 and r["wall_ms"] > 0 and "cpu_flags" in r for r in rows)
    assert all(r["cpu_vs_mkl"] == 1.0 for r in rows if r["kernel"] == "mkl") and "cpu vs mkl" in stdout
    _run("linear_kernels.py", "--model", "tiny-rn", "--batch", "2", "--repeats", "1", "--warmup", "0", "--out",
         tmp_path / "rn.jsonl")
    assert {r["tower"] for r in _rows(tmp_path / "rn.jsonl")} == {"text"}
