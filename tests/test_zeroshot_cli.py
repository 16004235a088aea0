"""`clip-pacl zeroshot`: per-image class probabilities from the command line."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.data import load_image
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.tokenizer import tokenize
from clip_pacl.transforms import image_transform
from clip_pacl.zeroshot.classifier import build_classifier, class_probabilities
from clip_pacl_app.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    generate_synthetic(root / "data", n=3, seed=0, image_size=64)
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # exp(2) ~ 7.4: spread-out probabilities, so the check below is sharp
    clip_pacl.save(model, root / "model")
    images = sorted((root / "data" / "images").glob("*.png"))
    return root / "model", images, model


def test_json_probabilities_match_softmax_of_scaled_cosine(setup, capsys):
    model_dir, images, model = setup
    classes = ["circle", "square", "red star"]
    args = ["zeroshot", "--model", str(model_dir), *map(str, images), "--classes", ",".join(classes),
            "--template", "a photo of a {}.", "--top-k", "10", "--batch-size", "2", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == classes and out["num_templates"] == 1 and len(out["results"]) == len(images)

    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenize([f"a photo of a {c}." for c in classes])), dim=-1)  # (C, D)
        transform = image_transform(model.image_size)
        for path, result in zip(images, out["results"]):
            image = model.encode_image(transform(load_image(path))[None], normalize=True)  # (1, D)
            expected = (model.logit_scale.exp() * image @ text.T).softmax(-1)[0]
            assert result["image"] == str(path)
            preds = result["predictions"]
            assert len(preds) == 3  # --top-k is capped at the number of classes
            assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
            got = {p["label"]: p["probability"] for p in preds}
            for c, name in enumerate(classes):
                assert got[name] == pytest.approx(float(expected[c]), abs=1e-5)


def test_readable_output_and_top_k(setup, capsys):
    model_dir, images, _ = setup
    args = ["zeroshot", "--model", str(model_dir), str(images[0]), "--classes", "cat,dog,bird",
            "--templates", "simple", "--top-k", "2"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images[0]) and len(lines) == 3
    assert all(line.strip().endswith("%") for line in lines[1:])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": "missing.png"}, "does not exist"),
        ({"image": "not_an_image"}, "not an image"),
        ({"classes": " , "}, "no class names"),
        ({"template": "no slot"}, "no '{}'"),
        ({"top_k": "0"}, "--top-k must be at least 1"),
    ],
)
def test_errors_are_one_line(setup, tmp_path, capsys, change, message):
    model_dir, images, _ = setup
    image = str(images[0])
    if change.get("image") == "missing.png":
        image = str(tmp_path / "missing.png")
    elif change.get("image") == "not_an_image":
        (tmp_path / "notes.png").write_text("hello")
        image = str(tmp_path / "notes.png")
    args = ["zeroshot", "--model", str(model_dir), image, "--classes", change.get("classes", "cat,dog"),
            "--top-k", change.get("top_k", "5")]
    if "template" in change:
        args += ["--template", change["template"]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_siglip_models_give_sigmoid_probabilities(setup):
    _, images, model = setup
    siglip = clip_pacl.CLIP(dataclasses.replace(model.config, init_logit_bias=-3.0)).eval()
    siglip.load_state_dict(model.state_dict(), strict=False)  # same towers, plus a logit bias
    classifier = build_classifier(siglip, ["circle", "square"], ["a {}"])
    pixels = image_transform(siglip.image_size)(load_image(images[0]))[None]
    with torch.no_grad():
        similarity = siglip.encode_image(pixels, normalize=True) @ classifier.T  # (1, 2)
    expected = (siglip.logit_scale.exp() * similarity - 3.0).sigmoid()
    torch.testing.assert_close(class_probabilities(siglip, pixels, classifier), expected)
    torch.testing.assert_close(class_probabilities(model, pixels, classifier).sum(), torch.tensor(1.0))


@pytest.mark.parametrize("command", ["zeroshot", "segment"])
@pytest.mark.parametrize("spec", ["classes.txt", "missing_dir/classes.txt", "names.csv"])
def test_a_missing_class_file_is_an_error_not_a_class(setup, tmp_path, monkeypatch, capsys, command, spec):
    model_dir, images, _ = setup
    monkeypatch.chdir(tmp_path)  # no classes.txt here
    args = [command, "--model", str(model_dir), str(images[0]), "--classes", spec]
    if command == "segment":
        args += ["--out", str(tmp_path / "mask.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: class-name file {spec} does not exist (to give class names instead, separate them " \
                  "with commas)"


def test_class_names_by_the_arguments_shape(tmp_path, monkeypatch):
    from clip_pacl.zeroshot.templates import resolve_class_names

    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert resolve_class_names("classes.txt") == ["cat", "dog"]  # an existing file is read
    assert resolve_class_names("cat") == ["cat"]  # a bare word is a class
    assert resolve_class_names("st. bernard,a.txt") == ["st. bernard", "a.txt"]  # commas: class names
    assert resolve_class_names("sea lion") == ["sea lion"]
