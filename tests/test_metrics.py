"""CLIPScore / RefCLIPScore: the formula, a direct computation, torchmetrics' CLIPScore on the same weights, the CLI."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_pacl
from clip_pacl.data import load_image
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import DataError
from clip_pacl.metrics import clip_s, clip_score, ref_clip_s
from clip_pacl.tokenizer import tokenize
from clip_pacl.transforms import image_transform
from clip_pacl_app.cli.main import main
from hf_clip_dir import write_hf_clip

CAPTIONS = ["a red circle", "a blue square on grass", "two green stars", "a photo of a cat", "noise", "a yellow cross"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "openai-tiny-clip"
    write_hf_clip(path, image_size=32)
    return path


@pytest.fixture(scope="module")
def tiny(hf_dir):
    """A random tiny CLIP whose image-caption cosines are mostly positive (the random `tiny` preset's are all
    negative, which CLIPScore clamps to 0 and would make these comparisons trivial)."""
    return clip_pacl.load(hf_dir).eval()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, 6, seed=0, image_size=64, captions_per_image=2)
    return out


def _direct(model, paths, captions) -> torch.Tensor:
    """The paper's formula by hand: 2.5 * max(cos(E_I, E_C), 0) per pair."""
    transform = image_transform(model.image_size)
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.stack([transform(load_image(p)) for p in paths])), dim=-1)
        text = F.normalize(model.encode_text(tokenize(captions)), dim=-1)
    return 2.5 * (image * text).sum(-1).clamp(min=0)


def test_formula_clamps_negative_cosines_and_takes_the_harmonic_mean():
    assert torch.equal(clip_s(torch.tensor([-0.3, 0.0, 0.2])), torch.tensor([0.0, 0.0, 0.5]))
    caption = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    refs = [torch.tensor([[0.6, 0.8], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0]])]  # best cos 0.6; cos -1 -> 0
    out = ref_clip_s(torch.tensor([0.5, 0.5]), caption, refs)
    assert out[0] == pytest.approx(2 * 0.5 * 0.6 / 1.1) and out[1] == 0.0
    with pytest.raises(DataError, match="at least one reference"):
        ref_clip_s(torch.tensor([0.5]), caption[:1], [torch.empty(0, 2)])


def test_scores_equal_a_direct_computation(tiny, synthetic):
    rows = list(csv.DictReader(open(synthetic / "captions.csv")))  # 2 captions per image: each image read once
    paths = [synthetic / r["image"] for r in rows]
    captions = [r["caption"] for r in rows]
    scores = clip_score(tiny, paths, captions)
    expected = _direct(tiny, paths, captions)
    assert (expected > 0).sum() >= 3 and (expected == 0).any()  # both sides of the clamp
    assert scores.pairs.tolist() == list(range(len(rows)))
    assert torch.allclose(scores.clip_score, expected, atol=1e-5)
    assert scores.summary()["clip_score"] == pytest.approx(float(expected.mean()), abs=1e-6)
    # the same pixels given as PIL images or as [0, 1] tensors score the same
    pil = [load_image(p) for p in paths]
    assert torch.allclose(clip_score(tiny, pil, captions).clip_score, expected, atol=1e-5)
    pixels = torch.stack([torch.from_numpy(np.array(im.resize((32, 32), Image.Resampling.BICUBIC))).permute(2, 0, 1)
                          for im in pil]) / 255  # (N, 3, 32, 32): resized as the eval transform does
    assert torch.allclose(clip_score(tiny, pixels, captions).clip_score, expected, atol=1e-5)
    assert torch.allclose(clip_score(tiny, paths, captions, w=100).clip_score, expected * 40, atol=1e-4)


def test_ref_clip_score_equals_a_direct_computation_and_unreadable_images_are_skipped(tiny, synthetic, tmp_path):
    paths = sorted((synthetic / "images").iterdir())[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    captions = ["a red circle", "a blue square", "noise", "a star"]
    references = [["a circle", "a red shape"], ["a square"], ["a cat", "a dog", "grass"], ["a star"]]
    scores = clip_score(tiny, [*paths, broken], captions, references, prefix="A photo depicts")
    assert scores.pairs.tolist() == [0, 1, 2] and scores.unreadable[0][0] == str(broken)
    prefixed = [f"A photo depicts {c}" for c in captions[:3]]
    clip = _direct(tiny, paths, prefixed)
    with torch.no_grad():
        text = F.normalize(tiny.encode_text(tokenize(prefixed)), dim=-1)
        expected = []
        for c, refs, s in zip(text, references, clip):
            r = F.normalize(tiny.encode_text(tokenize([f"A photo depicts {x}" for x in refs])), dim=-1)
            best = max(float((r @ c).max()), 0.0)
            expected.append(2 * float(s) * best / (float(s) + best))
    assert torch.allclose(scores.clip_score, clip, atol=1e-5)
    assert (clip > 0).any() and (torch.tensor(expected) > 0).any()
    assert torch.allclose(scores.ref_clip_score, torch.tensor(expected), atol=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        clip_score(tiny, paths, captions[:2])


# ----------------------------------------------------------------------------- torchmetrics on the same weights


class _FeatureTensors(torch.nn.Module):
    """transformers 5's get_*_features return a ModelOutput (projected `pooler_output`); torchmetrics 1.9 expects the
    tensor that transformers 4 returned. This adapter hands it the tensor and changes nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _torchmetrics_clip(hf_dir: Path):
    """What torchmetrics' `model_name_or_path` loading does for an "openai" path, with the adapter above."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    return _FeatureTensors(model), transformers.CLIPProcessor.from_pretrained(hf_dir)


def test_per_image_scores_equal_torchmetrics_clipscore(hf_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore

    images = torch.randint(0, 256, (len(CAPTIONS), 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))  # (N, 3, H, W)
    metric = CLIPScore(model_name_or_path=lambda: _torchmetrics_clip(hf_dir))
    theirs = []
    for image, caption in zip(images, CAPTIONS):  # one pair at a time: torchmetrics clamps the mean of a batch
        metric.reset()
        metric.update(image, caption)
        theirs.append(float(metric.compute()))
    ours = clip_score(clip_pacl.load(hf_dir).eval(), images.float() / 255, CAPTIONS, w=100).clip_score
    print("torchmetrics", theirs, "ours", ours.tolist())
    assert (ours - torch.tensor(theirs)).abs().max() < 1e-4
    assert len({round(t, 3) for t in theirs}) == len(CAPTIONS)  # distinct scores: the comparison is not trivial


# ----------------------------------------------------------------------------- CLI


def _write_pairs(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    return path


def test_cli_scores_pairs_with_references(hf_dir, synthetic, tmp_path, capsys):
    data = _write_pairs(synthetic / "pairs.csv", [("images/000000.png", "a red circle"),
                                                  ("images/000001.png", "a blue star")])
    refs = _write_pairs(synthetic / "refs.csv", [("images/000000.png", "a circle"), ("images/000001.png", "a star"),
                                                 ("images/000001.png", "blue")])
    assert main(["score", "--model", str(hf_dir), "--data", str(data), "--references", str(refs), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_pairs"] == 2 and [p["caption"] for p in result["pairs"]] == ["a red circle", "a blue star"]
    per_pair = [p["clip_score"] for p in result["pairs"]]
    images = [synthetic / "images/000000.png", synthetic / "images/000001.png"]
    library = clip_score(clip_pacl.load(hf_dir).eval(), images, ["a red circle", "a blue star"],
                         [["a circle"], ["a star", "blue"]])
    assert per_pair == pytest.approx(library.clip_score.tolist(), abs=1e-6)
    assert [p["ref_clip_score"] for p in result["pairs"]] == pytest.approx(library.ref_clip_score.tolist(), abs=1e-6)
    assert result["clip_score"] == pytest.approx(sum(per_pair) / 2)
    assert result["ref_clip_score"] == pytest.approx(sum(p["ref_clip_score"] for p in result["pairs"]) / 2)

    assert main(["score", "--model", "tiny", "--random-weights", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "CLIPScore" in out and "RefCLIPScore" not in out and "a blue star" in out


def test_cli_errors_are_one_line(synthetic, tmp_path, capsys):
    data = _write_pairs(synthetic / "pairs2.csv", [("images/000000.png", "a"), ("images/000002.png", "b")])
    refs = _write_pairs(synthetic / "refs2.csv", [("images/000000.png", "a circle")])
    for args, message in ((["--references", str(refs)], "no reference for 1 image(s)"),
                          (["--caption-key", "text"], "has no column 'text'")):
        assert main(["score", "--model", "tiny", "--random-weights", "--data", str(data), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "bad.png").write_bytes(b"")
    data = _write_pairs(tmp_path / "bad.csv", [("bad.png", "a")])
    assert main(["score", "--model", "tiny", "--random-weights", "--data", str(data)]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err
