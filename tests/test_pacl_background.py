"""Background without labelled masks: the rules, the calibration saved with a PACL checkpoint, the CLI's report."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_pacl
from clip_pacl.checkpoint.io import save
from clip_pacl.checkpoint.pacl import load_pacl
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import ConfigError
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.segmentation.background import RULES, BackgroundRule, otsu_threshold, resolve_background
from clip_pacl.segmentation.calibrate import calibrate_background, write_calibration
from clip_pacl.segmentation.predict import NO_CLASS, labels_from_scores, segment
from clip_pacl_app.cli.main import main

CLASSES = ["background", "red", "blue"]


def test_otsu_splits_two_clusters_between_them():
    values = torch.cat([torch.full((300,), 0.1), torch.full((100,), 0.6)]) + 0.01 * torch.randn(400)
    t = otsu_threshold(values)
    assert 0.2 < t < 0.5
    assert otsu_threshold(torch.full((10,), 0.3)) == pytest.approx(0.3)  # constant: no split, nothing below


@pytest.mark.parametrize("rule", ["zscore", "otsu"])
def test_per_image_rules_follow_each_images_own_scale(rule):
    # two images whose foreground/background scores sit at different levels; one fixed cosine fits only one
    for low, high in ((0.0, 0.3), (0.4, 0.8)):
        scores = torch.full((3, 8, 8), low) + 0.01 * torch.rand(3, 8, 8)
        scores[1, 2:5, 2:5] = high  # a 3x3 "red" object
        labels = labels_from_scores(scores, CLASSES, BackgroundRule(rule))
        assert (labels[2:5, 2:5] == 1).all() and (labels == 1).sum() == 9
        assert (labels[labels != 1] == 0).all()
    # without a background class the rejected pixels are unassigned
    labels = labels_from_scores(scores[1:], ["red", "blue"], BackgroundRule(rule))
    assert (labels == 0).sum() == 9 and (labels[labels != 0] == NO_CLASS).all()


def test_zscore_threshold_is_one_std_above_the_mean():
    best = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # mean 0.25, std 0.5: threshold 0.75
    scores = torch.stack([torch.zeros_like(best), best])  # (background, red)
    assert BackgroundRule("zscore").image_threshold(best) == pytest.approx(0.75)
    assert labels_from_scores(scores, ["background", "red"], BackgroundRule("zscore")).tolist() == [[0, 0, 0, 1]]


def test_auto_rule_depends_on_classes_model_and_calibration():
    clip = clip_pacl.load("tiny")
    pacl = PACL(clip, PACLConfig(hidden_dim=32))
    assert resolve_background(pacl, ["red", "blue"]).name == "none"  # no background class: plain argmax
    assert resolve_background(pacl, CLASSES) == BackgroundRule("zscore", note="auto")
    assert resolve_background(clip, CLASSES, method="maskclip") == BackgroundRule("zscore", note="auto")
    assert resolve_background(pacl, CLASSES, "otsu") == BackgroundRule("otsu")
    calibrated = PACL(clip, PACLConfig(hidden_dim=32, background_threshold=0.25))
    assert resolve_background(calibrated, CLASSES).name == "zscore"  # the evidence's default, calibrated or not
    assert resolve_background(calibrated, CLASSES, "calibrated") == BackgroundRule("calibrated", 0.25)
    # the calibration is on PACL's embedders' scale: the baselines on its base CLIP cannot use it
    with pytest.raises(ConfigError, match="no background calibration"):
        resolve_background(calibrated, CLASSES, "calibrated", method="patch")
    assert resolve_background(calibrated, CLASSES, "prompt").name == "prompt"
    assert resolve_background(calibrated, CLASSES, 0.4) == BackgroundRule("threshold", 0.4)
    assert resolve_background(calibrated, CLASSES, "0.4") == BackgroundRule("threshold", 0.4)
    with pytest.raises(ConfigError, match="clip-pacl calibrate"):
        resolve_background(pacl, CLASSES, "calibrated")
    with pytest.raises(ConfigError, match="unknown background rule"):
        resolve_background(pacl, CLASSES, "bright")


def test_old_configs_keep_the_settings_they_were_trained_with(tmp_path):
    assert PACLConfig().patch_tokens == "maskclip" and PACLConfig().pool_temperature == 0.05
    clip_pacl.save(PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("pool_temperature", "patch_tokens", "background_threshold"):  # as a checkpoint from before them
        del cfg["pacl"][key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = load_pacl(tmp_path).config
    assert (old.pool_temperature, old.patch_tokens, old.background_threshold) == (1.0, "tokens", None)
    assert PACLConfig.paper() == PACLConfig(pool_temperature=1.0, patch_tokens="tokens")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate_synthetic(root, 12, seed=0)
    return root


def test_calibration_is_saved_with_the_checkpoint_and_reloaded(synthetic, tmp_path):
    model = PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32))
    clip_pacl.save(model, tmp_path)
    result = calibrate_background(model, synthetic / "captions.csv", limit=8)
    assert result["images"] == 8 and 0 < result["object_fraction"] < 1
    write_calibration(model, tmp_path, result["background_threshold"])
    assert model.config.background_threshold == result["background_threshold"]
    assert load_pacl(tmp_path).config.background_threshold == result["background_threshold"]


def test_calibrate_command_then_segment_and_eval_report_the_rule(synthetic, tmp_path, capsys):
    clip_pacl.save(PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32)), tmp_path / "pacl")
    image = synthetic / "images" / "000000.png"
    classes = str(synthetic / "segmentation_colors" / "classes.txt")
    segment_args = ["segment", "--model", str(tmp_path / "pacl"), str(image), "--classes", classes,
                    "--out", str(tmp_path / "mask.png"), "--json"]
    assert main(segment_args) == 0  # the default: the per-image zscore rule, said on stderr and in the JSON
    out, err = capsys.readouterr()
    description = "per-image threshold: mean + 1 std of the image's best class scores; auto"
    assert json.loads(out)["background"] == {"rule": "zscore", "threshold": None, "description": description}
    assert f"background: {description}" in err
    # an old checkpoint has no calibration: asking for it says how to add one, in one line
    assert main([*segment_args, "--background", "calibrated"]) == 2
    err = capsys.readouterr().err
    assert "clip-pacl calibrate" in err and err.count("\n") == 1

    assert main(["calibrate", "--model", str(tmp_path / "pacl"), "--data", str(synthetic / "captions.csv"),
                 "--json"]) == 0
    threshold = json.loads(capsys.readouterr().out)["background_threshold"]
    assert main([*segment_args, "--background", "calibrated"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["background"] == {
        "rule": "calibrated", "threshold": threshold,
        "description": f"calibrated threshold {threshold:.4f} (from the training captions)"}
    assert f"calibrated threshold {threshold:.4f}" in err

    data = str(synthetic / "segmentation_colors")
    for flag, rule in (([], "zscore"), (["--background", "calibrated"], "calibrated"),
                       (["--background", "prompt"], "prompt"), (["--background-threshold", "0.3"], "threshold")):
        assert main(["eval", "segmentation", "--model", str(tmp_path / "pacl"), "--data", data, *flag, "--json"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["background"]["rule"] == rule and "background: " in err


def test_calibrate_a_trained_run_dir_then_segment_with_it(synthetic, tmp_path, capsys):
    from clip_pacl.train import TrainConfig, train

    clip_pacl.save(clip_pacl.load("tiny"), tmp_path / "clip")
    train(TrainConfig(data=str(synthetic / "captions.csv"), model=str(tmp_path / "clip"), out=str(tmp_path / "run"),
                      objective="pacl", steps=8, batch_size=12, lr=1e-3, seed=0, progress=False))
    # the run dir, as every other command takes it: its final/ model is calibrated
    assert main(["calibrate", "--model", str(tmp_path / "run"), "--data", str(synthetic / "captions.csv"),
                 "--json"]) == 0
    out, err = capsys.readouterr()
    threshold = json.loads(out)["background_threshold"]
    assert "is a training run: using" in err
    assert -1 <= threshold <= 1  # a cosine, on the scale segmentation compares with
    assert load_pacl(tmp_path / "run" / "final").config.background_threshold == threshold
    classes = str(synthetic / "segmentation_colors" / "classes.txt")
    image = str(synthetic / "images" / "000000.png")
    assert main(["segment", "--model", str(tmp_path / "run"), image, "--classes", classes, "--out",
                 str(tmp_path / "mask.png"), "--background", "calibrated", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["background"]["threshold"] == threshold
    assert result["fractions"]["background"] < 1  # some pixels are objects


def test_calibrate_command_errors_are_one_line(synthetic, tmp_path, capsys):
    save(clip_pacl.load("tiny"), tmp_path / "clip")
    assert main(["calibrate", "--model", str(tmp_path / "clip"), "--data", str(synthetic / "captions.csv")]) == 2
    assert "only PACL checkpoints" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "missing"), "--data", "x.csv"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("command", [["segment"], ["eval", "segmentation"]])
def test_background_help_lists_every_rule_and_what_auto_does(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    shown = set(re.findall(r"--background (\w+(?:\|\w+)+)", text))  # in the usage line and the option list
    assert len(shown) == 1
    listed = shown.pop().split("|")
    assert listed == [*RULES, "F"]
    calibrated = PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32, background_threshold=0.1))
    for name in RULES:  # every listed rule is one the code accepts, and each is described
        resolve_background(calibrated, CLASSES, name)
        assert f" {name} = " in text
    with pytest.raises(ConfigError, match="unknown background rule"):
        resolve_background(calibrated, CLASSES, "mean")
    auto = resolve_background(calibrated, CLASSES, "auto").name  # what auto does with a background class
    assert f"auto = with a 'background' class, {auto} (for every method)" in text


def test_segment_library_reports_its_rule():
    model = PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32, background_threshold=0.1)).eval()
    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    assert segment(model, image, CLASSES).background.name == "zscore"
    assert segment(model, image, CLASSES, background="calibrated").background.name == "calibrated"
    assert segment(model, image, CLASSES, background_threshold=0.3).background == BackgroundRule("threshold", 0.3)
    assert segment(model, image, ["red", "blue"]).background.name == "none"


def test_background_benchmark_and_flat_set_scripts_run(synthetic, tmp_path):
    root = Path(__file__).resolve().parent.parent / "benchmarks"

    def run(script, *args):
        proc = subprocess.run([sys.executable, str(root / script), *map(str, args)], capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    run("make_flat_objects.py", "--out", tmp_path / "flat", "--n", "3", "--seed", "1")
    mask = np.asarray(Image.open(tmp_path / "flat" / "masks" / "000000.png"))
    assert ((mask > 0) & (mask < 255)).any() and (mask == 0).any()  # an object and a background
    model = PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32, background_threshold=0.0))
    clip_pacl.save(model, tmp_path / "pacl")
    out = tmp_path / "bg.jsonl"
    stdout = run("pacl_background.py", "--pacl", tmp_path / "pacl", "--val", synthetic / "segmentation_colors",
                 "--test", tmp_path / "flat", "--grid", "0.1", "0.2", "--limit", "3", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    settings = {(r["method"], r["setting"]) for r in rows}
    assert ("pacl", "calibrated") in settings and ("patch", "calibrated") not in settings
    assert {s for _, s in settings} == {"prompt", "calibrated", "zscore", "otsu", "auto", "val-best"}
    assert all(r["rule"] == "zscore" for r in rows if r["setting"] == "auto")
    assert {r["background_threshold"] for r in rows if r["setting"] == "val-best"} <= {0.1, 0.2}
    assert sum("/flat | " in line for line in stdout.splitlines()) == 3  # the table: one line per method
