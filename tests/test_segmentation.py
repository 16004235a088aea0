"""Segmentation: the prediction pipeline (scores -> upsampling -> labels), mIoU, and the PACL/CLIP models on it."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import clip_pacl
from clip_pacl.errors import ConfigError
from clip_pacl.models.pacl import PACL
from clip_pacl.segmentation.metrics import ConfusionMatrix
from clip_pacl.segmentation.predict import NO_CLASS, labels_from_scores, score_maps, segment
from clip_pacl.tokenizer import get_tokenizer


class ColourOracle(nn.Module):
    """A stand-in PACL whose patch "embedding" is the patch's mean colour: red patches score high for a
    (1, 0, 0) text feature. It has PACL's segmentation interface, so the pipeline around it is tested exactly."""

    image_size = 32
    context_length = 77
    patch_stride = 8

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def patch_similarity(self, images, text_features):
        patches = F.avg_pool2d(images, 8)  # (B, 3, gh, gw)
        return torch.einsum("bchw,kc->bkhw", patches, text_features)

    def get_tokenizer(self):
        return get_tokenizer(self.context_length)


RED, BLUE = (230, 20, 20), (20, 20, 230)
CHANNEL_FEATURES = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # "red", "blue"


def _split_image(width=64, height=48, split=24):
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :split] = RED
    arr[:, split:] = BLUE
    return Image.fromarray(arr)


@pytest.mark.parametrize("sliding_window", [False, True])
def test_pipeline_labels_each_pixel_by_its_patch_scores(sliding_window):
    image = _split_image()
    result = segment(ColourOracle(), image, ["red", "blue"], text_features=CHANNEL_FEATURES,
                     sliding_window=sliding_window)
    assert result.label_map.shape == (48, 64) and result.scores.shape == (2, 48, 64)
    # away from the boundary (bilinear upsampling blurs one patch), every pixel has its own colour's label
    assert (result.label_map[:, :16] == 0).all() and (result.label_map[:, 32:] == 1).all()
    fractions = result.fractions()
    assert abs(sum(fractions.values()) - 1) < 1e-9 and 0.3 < fractions["red"] < 0.45


def test_sliding_window_covers_a_large_image_with_model_sized_crops():
    calls = []

    class Recording(ColourOracle):
        def patch_similarity(self, images, text_features):
            calls.append(tuple(images.shape[-2:]))
            return super().patch_similarity(images, text_features)

    (scores,) = score_maps(Recording(), [_split_image(100, 70, 40)], CHANNEL_FEATURES, "pacl", sliding_window=True)
    assert scores.shape == (2, 70, 100)
    assert set(calls) == {(32, 32)}  # every crop at the model's input size


def test_threshold_makes_background():
    scores = torch.tensor([[[0.9, 0.1]], [[0.2, 0.15]], [[0.5, 0.3]]])  # (C=3, H=1, W=2)
    assert labels_from_scores(scores, ["cat", "dog", "grass"]).tolist() == [[0, 2]]
    # the "background" class is not in the argmax; pixels under the threshold go to it
    assert labels_from_scores(scores, ["cat", "background", "grass"], 0.25).tolist() == [[0, 2]]
    assert labels_from_scores(scores, ["cat", "background", "grass"], 0.4).tolist() == [[0, 1]]
    # no background class: unassigned
    assert labels_from_scores(scores, ["cat", "dog", "grass"], 0.4).tolist() == [[0, NO_CLASS]]


def test_miou_is_accumulated_over_the_dataset():
    cm = ConfusionMatrix(4)
    cm.update(np.array([[0, 0], [1, 1]]), np.array([[0, 0], [1, 255]]))  # the ignored pixel does not count
    cm.update(np.array([[1, 0], [NO_CLASS, 0]]), np.array([[1, 1], [1, 0]]))
    m = cm.compute(["a", "b", "c", "d"])
    # class a: I = 3, U = 3 + 1 (a predicted where b is) = 4; class b: I = 2, U = 4 (GT) + 2 (pred) - 2 = 4
    assert m.per_class_iou == {"a": 0.75, "b": 0.5, "c": None, "d": None}
    assert m.miou == pytest.approx(0.625)  # c and d never appear: excluded from the mean
    assert m.pixel_accuracy == pytest.approx(5 / 7) and m.num_pixels == 7
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(np.zeros((2, 2)), np.zeros((3, 2)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-rn"])
def test_baselines_and_pacl_run_on_real_models(preset):
    clip = clip_pacl.load(preset).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8))
    for method in ("patch", "maskclip"):
        result = segment(clip, image, ["cat", "dog", "background"], templates=["a photo of a {}."], method=method)
        assert result.label_map.shape == (40, 90) and result.label_map.max() < 3
    pacl = PACL(clip).eval()
    result = segment(pacl, image, ["cat", "dog"], templates=["a {}.", "a photo of a {}."], sliding_window=True)
    assert result.scores.shape == (2, 40, 90)
    with pytest.raises(ConfigError, match="needs a PACL"):
        segment(clip, image, ["cat"], method="pacl")
    with pytest.raises(ConfigError, match="unknown segmentation method"):
        segment(clip, image, ["cat"], method="nope")


def test_pacl_patch_scores_are_its_patch_embeddings_against_its_text_embeddings():
    pacl = PACL(clip_pacl.load("tiny")).eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    from clip_pacl.segmentation.predict import _to_tensor, class_embeddings

    text = class_embeddings(pacl, ["cat", "dog"], ["a photo of a {}."], "pacl")
    with torch.no_grad():
        expected = pacl.patch_embeddings(_to_tensor(image)[None]) @ text.T  # (1, 64, 2)
    expected = F.interpolate(expected.transpose(1, 2).reshape(1, 2, 8, 8), size=(64, 64), mode="bilinear")[0]
    result = segment(pacl, image, ["cat", "dog"], templates=["a photo of a {}."])
    assert torch.allclose(result.scores, expected, atol=1e-5)
    assert (result.label_map == expected.argmax(dim=0).numpy()).all()


def test_class_colours_name_colours_and_keep_others_distinct():
    from clip_pacl.segmentation.overlay import BACKGROUND_COLOR, NAMED_COLORS, PALETTE, class_colors

    colors = class_colors(["background", "Red", "cat", "green ", "dog"])
    assert colors == [BACKGROUND_COLOR, NAMED_COLORS["red"], PALETTE[0], NAMED_COLORS["green"], PALETTE[1]]
    many = class_colors([f"class {i}" for i in range(len(PALETTE) + 2)])
    assert many[:len(PALETTE)] == list(PALETTE) and many[len(PALETTE)] == PALETTE[0]


def test_segmentation_prompts_are_the_zero_shot_prompt_ensemble():
    """One prompt-ensembling function, one template syntax, one error type for zero-shot and segmentation."""
    from clip_pacl.errors import DataError
    from clip_pacl.segmentation.predict import class_embeddings
    from clip_pacl.zeroshot.classifier import build_classifier

    clip = clip_pacl.load("tiny").eval()
    names, templates = ["cat", "red circle"], ["a photo of a {}.", "{} and {}"]
    torch.testing.assert_close(class_embeddings(clip, names, templates, "patch"),
                               build_classifier(clip, names, templates))
    for bad_names, bad_templates in ((names, ["a {c}"]), ([], templates), (names, [])):
        with pytest.raises(DataError):
            class_embeddings(clip, bad_names, bad_templates, "patch")
