"""The side-by-side segmentation figure: one row per image, ground truth in the class colours, one column per method."""

import numpy as np
import pytest

import clip_pacl
from clip_pacl.data.segmentation import open_segmentation_dataset
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.segmentation.figure import GAP, HEADER, SCALE, FigureColumn, colourise, comparison_figure, figure_colors
from clip_pacl.segmentation.predict import NO_CLASS, segment


@pytest.fixture(scope="module")
def colours_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, 3, seed=0, image_size=32, progress=False)
    return open_segmentation_dataset(out / "segmentation_colors")


def test_colourise_maps_classes_and_ignored_pixels():
    labels = np.array([[0, 1], [NO_CLASS, 7]])
    rgb = np.asarray(colourise(labels, [(1, 1, 1), (2, 2, 2)], (9, 9, 9)))
    assert rgb[:, :, 0].tolist() == [[1, 2], [9, 9]]  # unassigned and out-of-range pixels take the ignore colour


def test_colour_names_get_a_grey_background_and_cyan_ignore():
    colors, ignore = figure_colors(["background", "red", "white"])
    assert colors[0] == (128, 128, 128) and ignore == (0, 255, 255) and colors[1][0] > 200
    assert figure_colors(["background", "cat"])[1] == (255, 255, 255)


def test_figure_rows_columns_and_ground_truth(colours_dataset):
    model = clip_pacl.load("tiny").eval()
    columns = [FigureColumn("patches", model, "patch", None), FigureColumn("MaskCLIP", model, "maskclip", 0.3),
               FigureColumn("label-free", model, "maskclip")]
    figure = comparison_figure(colours_dataset, [0, 2], columns, ["a {} circle"])
    side = 32 * SCALE
    assert figure.width == 5 * side + 4 * GAP and figure.height > HEADER + 2 * (side + GAP)
    image, mask = colours_dataset[2]
    colors, ignore = figure_colors(list(colours_dataset.class_names))
    truth = np.asarray(figure)[HEADER + side + GAP:HEADER + 2 * side + GAP, side + GAP:2 * side + GAP]
    expected = np.asarray(colourise(mask, colors, ignore)).repeat(SCALE, 0).repeat(SCALE, 1)
    assert (truth == expected).all()  # the second row's ground truth, enlarged, in the class colours
    names = list(colours_dataset.class_names)
    assert [c.heading(names) for c in columns] == ["patches (prompt)", "MaskCLIP (0.3)", "label-free (zscore)"]


def test_a_label_free_column_segments_as_segment_does_by_default(colours_dataset):
    """A column left at its default background is what `segment` gives with no background asked for (the rule
    users get), not a threshold."""
    model = clip_pacl.load("tiny").eval()
    names, templates = list(colours_dataset.class_names), ["a {} circle"]
    figure = np.asarray(comparison_figure(colours_dataset, [1], [FigureColumn("MaskCLIP", model, "maskclip")],
                                          templates))
    side = 32 * SCALE
    image, _ = colours_dataset[1]
    default = segment(model, image, names, templates=templates, method="maskclip")
    assert default.background.name == "zscore"
    colors, ignore = figure_colors(names)
    expected = np.asarray(colourise(default.label_map, colors, ignore)).repeat(SCALE, 0).repeat(SCALE, 1)
    assert (figure[HEADER:HEADER + side, 2 * (side + GAP):2 * (side + GAP) + side] == expected).all()
