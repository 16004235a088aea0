"""`clip-pacl segment` and `clip-pacl eval segmentation` end to end on tiny models and a tiny dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clip_pacl
from clip_pacl.models.pacl import PACL, PACLConfig
from clip_pacl.segmentation.evaluate import evaluate_segmentation
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def pacl_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pacl")
    clip_pacl.save(PACL(clip_pacl.load("tiny"), PACLConfig(hidden_dim=32)), out)
    return out


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    """Three 64x64 images: left half red (class 1), right half background, one row ignored."""
    root = tmp_path_factory.mktemp("seg")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(3):
        arr = np.full((64, 64, 3), 128, dtype=np.uint8)
        arr[:, :32] = (220, 30, 30)
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:, :32] = 1
        mask[0] = 255
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "classes.txt").write_text("background\ncircle\n")
    return root


def test_segment_writes_mask_overlay_and_json(pacl_dir, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(image)
    rc = main(["segment", "--model", str(pacl_dir), str(image), "--classes", "cat,dog,grass",
               "--out", str(tmp_path / "mask.png"), "--overlay", str(tmp_path / "overlay.png"), "--json",
               "--template", "a photo of a {}."])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "pacl"
    assert set(result["fractions"]) == {"cat", "dog", "grass"}
    assert abs(sum(result["fractions"].values()) - 1) < 1e-6
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (48, 80) and mask.max() <= 2
    for i, name in enumerate(["cat", "dog", "grass"]):  # the JSON fractions describe the written mask
        assert abs((mask == i).mean() - result["fractions"][name]) < 1e-6
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.height >= 256 and overlay.width > overlay.height  # enlarged, with a legend on the right


def test_segment_baseline_methods_and_threshold_on_a_clip(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(image)
    rc = main(["segment", "--model", "tiny", "--random-weights",
               str(image), "--classes", "cat,dog", "--out", str(tmp_path / "m.png"),
               "--method", "maskclip", "--background-threshold", "2.0", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["unassigned"] == 1.0  # no cosine reaches 2: every pixel is left unassigned (255)
    assert (np.asarray(Image.open(tmp_path / "m.png")) == 255).all()


@pytest.mark.parametrize("argv, message", [
    (["--method", "pacl"], "needs a PACL checkpoint"),
    (["--template", "no placeholder"], "no '{}'"),
])
def test_segment_bad_input_is_one_line(tmp_path, capsys, argv, message):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    rc = main(["segment", "--model", "tiny", "--random-weights",
               str(image), "--classes", "cat", "--out", str(tmp_path / "m.png"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and message in err and "Traceback" not in err


def test_segment_missing_image_is_one_line(tmp_path, capsys):
    rc = main(["segment", "--model", "tiny", "--random-weights", str(tmp_path / "nope.png"), "--classes", "a", "--out",
               str(tmp_path / "m.png")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_eval_segmentation_cli(pacl_dir, seg_data, capsys):
    rc = main(["eval", "segmentation", "--model", str(pacl_dir), "--data", str(seg_data), "--json",
               "--batch-size", "2", "--template", "a photo of a {}."])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 3 and result["method"] == "pacl"
    assert set(result["per_class_iou"]) == {"background", "circle"}
    assert result["num_pixels"] == 3 * 63 * 64  # the ignored row is not counted
    rc = main(["eval", "segmentation", "--model", "tiny", "--random-weights",
               "--data", str(seg_data), "--method", "patch"])
    out = capsys.readouterr().out
    assert rc == 0 and "mIoU" in out and "circle" in out


def test_eval_with_a_perfect_threshold_scores_one(seg_data):
    """Thresholding alone separates this data: the red half scores high on every class, the grey half low.

    A stand-in model whose scores are the patch's redness makes the whole chain (dataset, batching,
    upsampling, background threshold, confusion matrix) checkable to an exact mIoU of 1.
    """
    from test_segmentation import ColourOracle

    class Redness(ColourOracle):
        image_size = 64  # the images' own size: an 8x8 grid whose patch boundary is the class boundary

        def encode_text(self, tokens, normalize=True):
            return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(tokens), 3)

    # normalised redness: about 1.42 on red patches, 0.08 on grey ones; 0.75 is the midpoint of the blend
    result = evaluate_segmentation(Redness(), seg_data, background_threshold=0.75, batch_size=2)
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0


def test_dataset_templates_file_is_the_default_and_flags_override_it(pacl_dir, seg_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "with_templates"
    shutil.copytree(seg_data, data)
    (data / "templates.txt").write_text("a {} shape\n\na red {}\n")
    assert main(["eval", "segmentation", "--model", str(pacl_dir), "--data", str(data), "--json", "--limit", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["templates"] == ["a {} shape", "a red {}"]
    assert main(["eval", "segmentation", "--model", str(pacl_dir), "--data", str(data), "--json", "--limit", "1",
                 "--template", "an image of a {}"]) == 0
    assert json.loads(capsys.readouterr().out)["templates"] == ["an image of a {}"]
    assert main(["eval", "segmentation", "--model", str(pacl_dir), "--data", str(seg_data), "--json",
                 "--limit", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["templates"]) == 4  # no file: the default four
    (data / "templates.txt").write_text("no placeholder\n")
    assert main(["eval", "segmentation", "--model", str(pacl_dir), "--data", str(data), "--limit", "1"]) == 2
    assert "no placeholder" in capsys.readouterr().err


def test_threshold_sweep_equals_one_evaluation_per_threshold(pacl_dir, seg_data):
    from clip_pacl.segmentation.evaluate import evaluate_segmentation_thresholds

    model = clip_pacl.load(str(pacl_dir)).eval()
    thresholds = [None, 0.0, 0.2, 0.9]
    sweep = evaluate_segmentation_thresholds(model, seg_data, thresholds, batch_size=2, method="maskclip")
    assert [r["background_threshold"] for r in sweep] == thresholds
    for threshold, swept in zip(thresholds, sweep):
        single = evaluate_segmentation(model, seg_data, method="maskclip", background_threshold=threshold,
                                       background="prompt")  # what None means in a sweep
        for key in ("miou", "pixel_accuracy", "per_class_iou", "num_images"):
            assert swept[key] == single[key]
    assert len({r["pixel_accuracy"] for r in sweep}) > 1  # the thresholds really label differently
