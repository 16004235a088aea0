"""The segmentation benchmark scripts the README quotes run end to end and write the JSONL they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import clip_pacl
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.models.pacl import PACL, PACLConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    generate_synthetic(tmp / "data", 12, seed=0)
    clip_pacl.save(PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32, patch_tokens="maskclip")),
                   tmp / "pacl")
    return tmp


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_pacl_segmentation_benchmark(setup):
    out = setup / "seg.jsonl"
    data = setup / "data"
    stdout = _run("pacl_segmentation.py", "--pacl", setup / "pacl", "--data", data / "segmentation_colors",
                  data / "segmentation", "--thresholds", "none", "0.3", "--limit", "4", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2  # datasets x methods x thresholds
    assert {r["method"] for r in rows} == {"patch", "maskclip", "pacl"}
    assert {r["background_threshold"] for r in rows} == {None, 0.3}
    assert all(r["num_images"] == 4 and 0.0 <= r["miou"] <= 1.0 for r in rows)
    assert rows[0]["templates"][0] == "a {} circle"  # the dataset's templates.txt
    assert stdout.count("PACL / better baseline") == 2


def test_patch_probe_benchmark(setup):
    out = setup / "probe.jsonl"
    data = setup / "data"
    stdout = _run("patch_probe.py", "--model", "tiny", "--train", data / "segmentation_colors",
                  "--test", data / "segmentation_colors", "--n-train", "8", "--n-test", "4", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sources = [r["source"] for r in rows]
    assert sources == ["embed", "block0", "block1", "block2", "block3", "tokens", "maskclip"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["foreground_accuracy"] <= 1.0 for r in rows)
    assert "foreground accuracy" in stdout


def test_benchmark_scripts_report_a_missing_path_in_one_line(setup, tmp_path):
    missing = tmp_path / "missing"
    for args in (["pacl_segmentation.py", "--pacl", setup / "pacl", "--data", missing],
                 ["patch_probe.py", "--model", "tiny", "--train", missing, "--test", missing]):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *map(str, args[1:])],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            f"error: segmentation data {missing} does not exist"]


def test_recipes_benchmark_quick(tmp_path):
    """benchmarks/recipes.py (the README's training-recipes table) runs every recipe end to end and reports it."""
    out = tmp_path / "recipes.jsonl"
    stdout = _run("recipes.py", "--quick", "--kinds", "patterns", "--jobs", "1", "--recipes", "clip-pacl",
                  "clip-pacl:beta2=0.98,grad_clip=0", "open_clip_train", "plain", "--tag", "smoke",
                  "--workdir", tmp_path / "work", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["recipe"] for r in rows) == ["clip-pacl", "clip-pacl:beta2=0.98,grad_clip=0", "open_clip_train",
                                                 "plain"]
    assert all(r["dataset"] == "patterns" and r["steps"] == 3 and 0 <= r["zeroshot_top1"] <= 1
               and abs(r["chance"] - 1 / 6) < 1e-3 and r["heldout_images"] == 8 for r in rows)
    assert stdout.count("| patterns (chance 0.167) |") == 4
    assert _run("recipes.py", "--table", out, "--tag", "smoke") == stdout


def test_recipes_benchmark_at_another_model_size(tmp_path):
    """--image-size / --layers change the data and both libraries' models (issue 10's own: 64 px, 3 layers)."""
    out = tmp_path / "recipes.jsonl"
    _run("recipes.py", "--quick", "--kinds", "counts", "--jobs", "1", "--recipes", "clip-pacl", "plain",
         "--image-size", "16", "--layers", "1", "--workdir", tmp_path / "work", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["model"]["vision_cfg"]["image_size"] == 16 and r["model"]["vision_cfg"]["layers"]
                                  == 1 and r["model"]["text_cfg"]["layers"] == 1 for r in rows)
    assert [r["trained"]["image_size"] for r in rows] == [16, 16]  # what each run really trained
    assert [r["trained"]["layers"] for r in rows] == [[1, 1], [1, 1]]
    assert rows[0]["trained"]["params"] == rows[1]["trained"]["params"]
    assert {p.name for p in (tmp_path / "work").iterdir()} == {"counts-16-8-16", "runs"}
    assert not list((tmp_path / "work" / "runs").iterdir())  # every run's directory and model file cleaned up


def test_recipes_compare_pairs_runs_by_seed(tmp_path):
    """--compare: our recipe minus each other one over the seeds both ran, mean and 95% t-interval."""
    runs = [("shapes", "clip-pacl", 0, 0.30, 0.20), ("shapes", "clip-pacl", 1, 0.40, 0.20),
            ("shapes", "clip-pacl", 2, 0.50, 0.20), ("shapes", "plain", 0, 0.29, 0.30), ("shapes", "plain", 1, 0.38,
            0.30), ("shapes", "plain", 2, 0.47, 0.30), ("shapes", "plain", 3, 0.99, 0.99),  # seed 3: plain only
            ("shapes", "clip-pacl:wd=0.1", 0, 0.9, 0.9), ("counts", "open_clip_train", 0, 0.5, 0.5)]
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps({"tag": "t", "dataset": d, "recipe": r, "seed": s, "zeroshot_top1": z,
                                       "t2i_R@1": t, "seconds": 1.0}) + "\n" for d, r, s, z, t in runs))
    stdout = _run("recipes.py", "--table", out, "--tag", "t", "--compare", "clip-pacl")
    rows = [line for line in stdout.split("minus")[1].splitlines() if line.startswith("| shapes | plain |")]
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, 95% half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert rows == ["| shapes | plain | 3 | +0.020 (-0.005..+0.045) | -0.100 (-0.100..-0.100) |"]
    assert "| counts |" not in stdout.split("minus")[1]  # no clip-pacl run there to pair with


def test_search_benchmark_quick(tmp_path):
    """benchmarks/search.py (the README's search table) measures every method on the same queries."""
    out = tmp_path / "search.jsonl"
    stdout = _run("search.py", "--quick", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["factory"] or r["method"], r["setting"]): r for r in rows}
    assert set(got) == {("torch", ""), ("faiss-flat", ""), ("PQ32x4fs", "rerank=4"), ("PQ32x4fs", "rerank=40"),
                        ("IVF16,Flat", "nprobe=1"), ("IVF16,Flat", "nprobe=16"), ("HNSW16", "ef_search=64")}
    for exact in (("torch", ""), ("faiss-flat", ""), ("IVF16,Flat", "nprobe=16")):
        assert got[exact]["recall@10"] == 1.0, exact  # exact search, or every list probed
    assert got[("IVF16,Flat", "nprobe=1")]["recall@10"] < 0.5  # one list of 16
    assert got[("PQ32x4fs", "rerank=4")]["recall@10"] < got[("PQ32x4fs", "rerank=40")]["recall@10"]
    assert got[("PQ32x4fs", "rerank=40")]["recall@10"] >= 0.95  # 400 candidates of 2,000 re-ranked exactly
    assert all(r["size"] == 2000 and r["queries"] == 20 and r["faiss"] and r["torch"] and r["faiss_threads"] >= 1
               and r["p50_ms"] <= r["p99_ms"] and r["index_mb"] > 0 for r in rows)
    assert stdout.count("| 2,000 |") == 7
