"""`eval zeroshot --model PACL_DIR` scores with PACL's compatibility; benchmarks/pacl_zeroshot.py compares to CLIP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip_pacl
from clip_pacl.data import load_image, read_label_rows
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.transforms import image_transform
from clip_pacl.zeroshot.classifier import build_classifier
from clip_pacl.zeroshot.templates import SIMPLE_IMAGENET_TEMPLATES
from clip_pacl_app.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pacl_zs")
    generate_synthetic(tmp / "data", 16, seed=0, max_objects=1)
    torch.manual_seed(0)
    clip_pacl.save(PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32)), tmp / "pacl")
    return tmp


def _top1(model, rows, score) -> float:
    names = sorted({r.label for r in rows})
    classifier = build_classifier(model, names, SIMPLE_IMAGENET_TEMPLATES)
    transform = image_transform(model.image_size)
    with torch.no_grad():
        scores = score(torch.stack([transform(load_image(r.image)) for r in rows]), classifier)  # (N, C)
    return float((scores.argmax(1) == torch.tensor([names.index(r.label) for r in rows])).double().mean())


def test_cli_eval_zeroshot_on_a_pacl_dir_uses_the_compatibility(setup, capsys, monkeypatch):
    calls = []
    compatibility = PACL.similarity

    def spy(self, images, text_features):  # PACL.similarity is phi (tests/test_pacl.py); count that it is used
        calls.append(len(images))
        return compatibility(self, images, text_features)

    monkeypatch.setattr(PACL, "similarity", spy)
    data = setup / "data" / "colors.csv"
    assert main(["eval", "zeroshot", "--model", str(setup / "pacl"), "--data", str(data), "--templates", "simple",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = read_label_rows(data)
    assert sum(calls) == len(rows) == result["num_images"]  # every image scored by the compatibility
    pacl = clip_pacl.load(setup / "pacl").eval()
    assert result["top1"] == pytest.approx(_top1(pacl, rows, compatibility.__get__(pacl)))


def test_benchmark_writes_pacl_beside_its_base_clip(setup):
    out = setup / "zs.jsonl"
    data = setup / "data"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pacl_zeroshot.py"), "--pacl", str(setup / "pacl"),
                           "--data", str(data / "colors.csv"), str(data / "shapes.csv"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["data"]).name, r["method"]) for r in rows] == [
        ("colors.csv", "clip"), ("colors.csv", "pacl"), ("shapes.csv", "clip"), ("shapes.csv", "pacl")]
    base = clip_pacl.load(setup / "pacl").clip.eval()
    cosine = _top1(base, read_label_rows(data / "colors.csv"),
                   lambda images, c: base.encode_image(images, normalize=True) @ c.T)
    assert all(0 <= r["top1"] <= 1 and r["num_templates"] == 7 for r in rows)
    assert rows[0]["top1"] == pytest.approx(cosine, abs=1e-4)
    assert proc.stdout.count("top-1 CLIP") == 2
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pacl_zeroshot.py"), "--pacl", "tiny",
                           "--data", str(data / "colors.csv"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: tiny is not a PACL checkpoint"
