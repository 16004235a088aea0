"""Zero-shot evaluation: templates, prompt ensembling, metrics on planted features, the `eval zeroshot` command."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import clip_pacl
from clip_pacl.data import load_image, read_label_rows
from clip_pacl.data.imagefolder import read_class_folders
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import DataError
from clip_pacl.models.pacl import PACL
from clip_pacl.tokenizer import get_tokenizer, tokenize
from clip_pacl.transforms import image_transform
from clip_pacl.zeroshot.classifier import build_classifier
from clip_pacl.zeroshot.evaluate import classification_metrics, evaluate_zeroshot, label_indices
from clip_pacl.zeroshot.templates import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    format_prompt,
    resolve_class_names,
    resolve_templates,
)
from clip_pacl_app.cli.main import main
from helpers import require


def write_table(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return clip_pacl.load("tiny").eval()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=16, seed=0, image_size=64, max_objects=1)
    return out


# ----------------------------------------------------------------------------- templates


def test_template_sets_are_openais():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(SIMPLE_IMAGENET_TEMPLATES) == 7
    assert set(SIMPLE_IMAGENET_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert all("{}" in t for t in OPENAI_IMAGENET_TEMPLATES)
    assert len(IMAGENET_CLASSNAMES) == 1000 and len(set(IMAGENET_CLASSNAMES)) == 998  # "missile", "sunglasses" twice
    assert IMAGENET_CLASSNAMES[0] == "tench" and IMAGENET_CLASSNAMES[-1] == "toilet paper"


def test_template_resolution(tmp_path):
    assert format_prompt("a photo of a {}.", "cat") == "a photo of a cat."
    assert format_prompt("a {} or not a {}", "cat") == "a cat or not a cat"
    assert resolve_templates() == list(OPENAI_IMAGENET_TEMPLATES)
    assert resolve_templates("simple") == list(SIMPLE_IMAGENET_TEMPLATES)
    assert resolve_templates(None, ["a {}"]) == ["a {}"]  # explicit templates replace the default set
    assert resolve_templates("simple", ["a {}"])[-1] == "a {}"  # ...and add to a named one
    (tmp_path / "t.txt").write_text("a {} here\n\n  the {}  \n")
    assert resolve_templates(str(tmp_path / "t.txt")) == ["a {} here", "the {}"]
    for template in ("a photo", "the {c}"):  # one slot syntax: {}
        with pytest.raises(DataError, match="no '{}'"):
            resolve_templates(None, [template])
    with pytest.raises(DataError, match="not a file of templates"):
        resolve_templates(str(tmp_path / "missing.txt"))
    assert resolve_class_names("cat, dog ,bird") == ["cat", "dog", "bird"]
    assert resolve_class_names("imagenet")[:2] == ["tench", "goldfish"]
    with pytest.raises(DataError, match="repeated"):
        resolve_class_names("cat,dog,cat")


# ----------------------------------------------------------------------------- classifier


def test_classifier_is_mean_of_normalised_prompt_embeddings(tiny_model):
    classes, templates = ["cat", "dog", "red circle"], ["a photo of a {}.", "a {} drawing", "{}!"]
    classifier = build_classifier(tiny_model, classes, templates, batch_size=4)  # 9 prompts: uneven batches
    assert classifier.shape == (3, tiny_model.embed_dim)
    with torch.no_grad():
        for c, name in enumerate(classes):
            prompts = [t.replace("{}", name) for t in templates]
            per_prompt = tiny_model.encode_text(tokenize(prompts))  # (T, D)
            expected = F.normalize(F.normalize(per_prompt, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(classifier[c], expected, atol=1e-5, rtol=1e-5)


def test_classifier_matches_open_clip(tmp_path):
    open_clip = require("open_clip")
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    cfg = json.loads((Path(clip_pacl.__file__).parent / "presets" / "tiny.json").read_text())
    reference = open_clip.CLIP(**cfg).eval()
    torch.save(reference.state_dict(), tmp_path / "open_clip.pt")
    ours = clip_pacl.load(tmp_path / "open_clip.pt", quick_gelu=False).eval()
    names = ["cat", "dog", "red circle", "potter's wheel"]
    expected = build_zero_shot_classifier(reference, open_clip.get_tokenizer("ViT-B-32"), names,
                                          SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=3)  # (D, C)
    got = build_classifier(ours, names, SIMPLE_IMAGENET_TEMPLATES, batch_size=5)  # (C, D)
    torch.testing.assert_close(got, expected.T, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6], [0.3, 0.1, 0.2]])
    targets = torch.tensor([0, 1, 1, 2, 2])
    m = classification_metrics(scores, targets, ["a", "b", "c"])
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["top5_k"] == 3 and m["top5"] == 1.0  # k is capped at the number of classes
    assert m["per_class_recall"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.5})
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)
    # a class with no image is a candidate but not part of the per-class mean
    m = classification_metrics(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([1]), ["a", "b", "c"])
    assert m["per_class_recall"] == {"b": 1.0} and m["mean_per_class_recall"] == 1.0
    # a repeated class name (ImageNet has two) keeps one entry per class
    scores = torch.cat([torch.eye(3), torch.tensor([[0.0, 0.0, 1.0]])])  # predicts 0, 1, 2, 2
    m = classification_metrics(scores, torch.tensor([0, 1, 2, 0]), ["x", "y", "x"])
    assert m["per_class_recall"] == {"x": 0.5, "y": 1.0, "x #2": 1.0}


def test_label_indices():
    assert label_indices(["dog", "cat", "dog"], None) == (["cat", "dog"], [1, 0, 1])
    assert label_indices(["dog", "cow"], ["dog", "cat"]) == (["dog", "cat"], [0, None])
    assert label_indices(["1", "0"], ["dog", "cat"]) == (["dog", "cat"], [1, 0])  # integer ids index the classes
    with pytest.raises(DataError, match="out of range"):
        label_indices(["5"], ["dog", "cat"])


class ColorModel(nn.Module):
    """Image feature = one-hot of the strongest colour channel; text feature = one-hot of the class in the prompt.

    With planted features the expected metrics are known exactly, so the evaluation code is really tested.
    """

    classes = ("red", "green", "blue")
    image_size = 16
    context_length = 77
    embed_dim = 3

    model_type = "clip"
    logit_bias = None

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.prompt_class = {}
        for c, name in enumerate(self.classes):
            for template in SIMPLE_IMAGENET_TEMPLATES:
                self.prompt_class[tuple(tokenize(format_prompt(template, name))[0].tolist())] = c

    def encode_text(self, tokens, normalize=False):
        ids = [self.prompt_class[tuple(row.tolist())] for row in tokens]
        return F.one_hot(torch.tensor(ids), 3).float()

    def encode_image(self, images, normalize=False):
        return F.one_hot(images.mean(dim=(2, 3)).argmax(dim=1), 3).float()

    def similarity(self, images, text_features):
        return self.encode_image(images, normalize=True) @ text_features.T

    def get_tokenizer(self):
        return get_tokenizer(self.context_length)

    def image_transform(self, train=False, image_size=None):
        return image_transform(image_size or self.image_size, train=train)


def test_planted_features_give_known_metrics(tmp_path):
    colors = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    # (drawn colour, label): red 4/5 right, green 2/2, blue 1/2 -> top-1 7/9, mean per-class (0.8 + 1 + 0.5) / 3
    plan = [("red", "red")] * 4 + [("green", "red"), ("green", "green"), ("green", "green"),
                                   ("blue", "blue"), ("red", "blue")]
    rows = []
    for i, (drawn, label) in enumerate(plan):
        Image.new("RGB", (20, 20), colors[drawn]).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", label))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append(("broken.png", "green"))
    data = write_table(tmp_path / "labels.csv", ("image", "label"), rows)

    result = evaluate_zeroshot(ColorModel(), read_label_rows(data), SIMPLE_IMAGENET_TEMPLATES, batch_size=4,
                               class_names=["red", "green", "blue"], progress=False)
    assert result["top1"] == pytest.approx(7 / 9)
    assert result["per_class_recall"] == pytest.approx({"red": 0.8, "green": 1.0, "blue": 0.5})
    assert result["mean_per_class_recall"] == pytest.approx((0.8 + 1.0 + 0.5) / 3)
    assert result["top5"] == 1.0 and result["top5_k"] == 3
    assert (result["num_images"], result["num_classes"], result["num_unreadable"]) == (9, 3, 1)
    assert result["unreadable"][0]["path"].endswith("broken.png")

    # --classes restricts: the blue rows are left out and counted
    result = evaluate_zeroshot(ColorModel(), read_label_rows(data), SIMPLE_IMAGENET_TEMPLATES,
                               class_names=["red", "green"], progress=False)
    assert result["skipped_rows"] == 2 and result["num_images"] == 7
    assert result["top1"] == pytest.approx(6 / 7)


def test_class_folders(tmp_path):
    colors = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    for name, rgb in colors.items():
        (tmp_path / name / "deeper").mkdir(parents=True)
        Image.new("RGB", (20, 20), rgb).save(tmp_path / name / "a.png")
        Image.new("RGB", (20, 20), rgb).save(tmp_path / name / "deeper" / "b.jpg")
    (tmp_path / "red" / "readme.txt").write_text("not an image")
    rows = read_class_folders(tmp_path)
    assert len(rows) == 6 and [r.label for r in rows] == ["blue"] * 2 + ["green"] * 2 + ["red"] * 2
    result = evaluate_zeroshot(ColorModel(), rows, SIMPLE_IMAGENET_TEMPLATES, progress=False)
    assert result["top1"] == 1.0 and result["num_images"] == 6

    # folders that are not class names but as many as the classes: ids in sorted order (ImageNet's synset folders)
    rows = read_class_folders(tmp_path, ["blue", "green", "red"])
    assert [r.label for r in rows][::2] == ["blue", "green", "red"]
    rows = read_class_folders(tmp_path, ["sky", "grass", "blood"])
    assert [r.label for r in rows][::2] == ["0", "1", "2"]
    with pytest.raises(DataError, match="no class folders"):
        read_class_folders(tmp_path / "red" / "deeper")


def test_tiny_model_agrees_with_brute_force(tiny_model, synthetic):
    rows = read_label_rows(synthetic / "shapes.csv")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    result = evaluate_zeroshot(tiny_model, rows, templates, batch_size=5, progress=False)
    names = sorted({r.label for r in rows})
    assert result["num_images"] == len(rows) and result["num_classes"] == len(names)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert set(result["per_class_recall"]) == {r.label for r in rows}

    classifier = build_classifier(tiny_model, names, templates)
    transform = image_transform(tiny_model.image_size)
    with torch.no_grad():
        features = tiny_model.encode_image(torch.stack([transform(load_image(r.image)) for r in rows]), normalize=True)
    hits, per_class = 0, {}
    for row, feature in zip(rows, features):
        predicted = names[int((classifier @ feature).argmax())]
        hits += predicted == row.label
        per_class.setdefault(row.label, []).append(predicted == row.label)
    assert result["top1"] == pytest.approx(hits / len(rows))
    expected = {name: sum(v) / len(v) for name, v in per_class.items()}
    assert result["per_class_recall"] == pytest.approx(expected)


def test_pacl_model_is_scored_by_its_compatibility(tiny_model, synthetic):
    torch.manual_seed(1)
    pacl = PACL(tiny_model).eval()
    rows = read_label_rows(synthetic / "colors.csv")
    result = evaluate_zeroshot(pacl, rows, ["a {} shape"], batch_size=6, progress=False)
    names = sorted({r.label for r in rows})
    classifier = build_classifier(pacl, names, ["a {} shape"])  # PACL's text embedder output
    transform = image_transform(pacl.image_size)
    with torch.no_grad():
        scores = pacl.similarity(torch.stack([transform(load_image(r.image)) for r in rows]), classifier)  # (N, C)
    targets = torch.tensor([names.index(r.label) for r in rows])
    assert result["top1"] == pytest.approx(float((scores.argmax(1) == targets).float().mean()))


# ----------------------------------------------------------------------------- CLI


def test_cli_json_and_table(synthetic, capsys):
    args = ["eval", "zeroshot", "--model", "tiny", "--random-weights",
            "--data", str(synthetic / "colors.csv"), "--templates", "simple"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_templates"] == 7 and result["num_images"] > 0
    assert 0.0 <= result["top1"] <= 1.0 and result["model"] == "tiny"

    assert main([*args, "--template", "a {} shape", "--classes", "red,green,blue,white"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "mean per-class recall" in out and "8 templates" in out and "4 classes" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label-key", "shape"], "has no column 'shape'"),
        (["--template", "no slot"], "no '{}'"),
        (["--classes", "nothing,matches"], "no image has a label among"),
    ],
)
def test_cli_errors_are_one_line(synthetic, capsys, extra, message):
    args = ["eval", "zeroshot", "--model", "tiny", "--random-weights", "--data", str(synthetic / "shapes.csv"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_missing_data_file(tmp_path, capsys):
    assert main(["eval", "zeroshot", "--model", "tiny", "--random-weights", "--data", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.csv" in err and "\n" not in err
