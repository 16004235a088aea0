"""`convert --to hf` writes a directory transformers takes as it is: `CLIPProcessor.from_pretrained(DIR)` and the
zero-shot image classification pipeline, whose scores equal `clip-pacl zeroshot`'s probabilities."""

import json

import pytest
import torch
from PIL import Image

import clip_pacl
from clip_pacl.formats.hf_processor import PROCESSOR_FILES
from clip_pacl_app.cli.main import main
from helpers import randomize_, require

transformers = require("transformers")

CAPTIONS = ["a photo of a cat", "Hello,   World! it's 3 DOGS", "two shapes: a red hexagon and a red star"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    model = randomize_(clip_pacl.load("tiny", random_weights=True))  # every tensor random: nothing left at init
    clip_pacl.save(model, root / "ckpt")
    assert main(["convert", str(root / "ckpt"), "--to", "hf", "--out", str(root / "hf")]) == 0
    Image.new("RGB", (90, 70), (200, 30, 30)).save(root / "red.png")  # not square: resize and crop matter
    return root, clip_pacl.load(root / "ckpt").eval()


def test_the_export_holds_processor_and_tokenizer_files(exported):
    root, _ = exported
    assert all((root / "hf" / name).is_file() for name in PROCESSOR_FILES)


def test_clip_processor_loads_and_feeds_the_model_what_ours_does(exported):
    root, model = exported
    processor = transformers.CLIPProcessor.from_pretrained(root / "hf")
    ids = processor.tokenizer(CAPTIONS)["input_ids"]
    ours = model.get_tokenizer()(CAPTIONS)
    for row, theirs in zip(ours.tolist(), ids):
        assert row[:len(theirs)] == theirs and not any(row[len(theirs):])  # same ids, ours padded with 0
    image = Image.open(root / "red.png")
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels[0], model.image_transform()(image), atol=1e-6)


def test_pipeline_scores_equal_our_zeroshot_probabilities(exported, capsys):
    root, _ = exported
    labels = ["cat", "dog", "red hexagon"]
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(root / "hf"))
    theirs = {r["label"]: r["score"] for r in pipe(Image.open(root / "red.png"), candidate_labels=labels)}
    assert main(["zeroshot", "--model", str(root / "ckpt"), str(root / "red.png"), "--classes", ",".join(labels),
                 "--template", "This is a photo of {}.", "--json"]) == 0  # the pipeline's default template
    ours = {p["label"]: p["probability"] for p in json.loads(capsys.readouterr().out)["results"][0]["predictions"]}
    assert theirs.keys() == ours.keys()
    for label in labels:
        assert theirs[label] == pytest.approx(ours[label], abs=1e-5), label
    assert max(ours.values()) - min(ours.values()) > 1e-3  # the scores differ: the comparison can fail
