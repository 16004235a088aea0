"""Segmentation datasets: our folder format and the benchmark layouts, built as tiny fake trees."""

import numpy as np
import pytest
from PIL import Image

from clip_pacl.data.segmentation import (
    ADE20K_CLASSES,
    COCOSTUFF_CLASSES,
    CONTEXT59_CLASSES,
    VOC_CLASSES,
    open_segmentation_dataset,
)
from clip_pacl.errors import DataError


def _pair(image_dir, mask_dir, stem, mask_values, mask_suffix=".png", image_ext=".jpg", palette=False):
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    mask = np.array(mask_values, dtype=np.uint8)
    Image.new("RGB", (mask.shape[1], mask.shape[0]), (120, 30, 30)).save(image_dir / f"{stem}{image_ext}")
    img = Image.fromarray(mask, mode="L")
    if palette:  # VOC masks are palette PNGs: the indices are the labels, not the colours
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    img.save(mask_dir / f"{stem}{mask_suffix}")


def test_folder_format_and_synthetic_root(tmp_path):
    root = tmp_path / "set" / "segmentation"
    _pair(root / "images", root / "masks", "a", [[0, 1], [2, 255]], image_ext=".png")
    _pair(root / "images", root / "masks", "b", [[1, 1], [1, 1]], image_ext=".png")
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    ds = open_segmentation_dataset(tmp_path / "set")  # the synthetic set's top folder finds segmentation/
    assert ds.name == "folder" and len(ds) == 2
    assert ds.class_names == ("background", "cat", "dog") and ds.background_index == 0
    image, mask = ds[0]
    assert image.size == (2, 2) and mask.tolist() == [[0, 1], [2, 255]]


def test_folder_without_masks_or_classes_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "x.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="have no mask"):
        open_segmentation_dataset(tmp_path)
    with pytest.raises(DataError, match="is not a segmentation dataset"):
        open_segmentation_dataset(tmp_path / "images")
    with pytest.raises(DataError, match="does not exist"):
        open_segmentation_dataset(tmp_path / "nope")


def test_voc_layout_reads_palette_indices_and_the_val_split(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    _pair(root / "JPEGImages", root / "SegmentationClass", "2007_000001", [[0, 15], [255, 20]], palette=True)
    _pair(root / "JPEGImages", root / "SegmentationClass", "2007_000002", [[0, 0], [0, 0]], palette=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    ds = open_segmentation_dataset(tmp_path)
    assert ds.name == "voc" and len(ds) == 1 and len(ds.class_names) == 21 and ds.background_index == 0
    assert ds.class_names[15] == "person"
    assert ds[0][1].tolist() == [[0, 15], [255, 20]]


def test_context59_reduces_the_zero_label(tmp_path):
    root = tmp_path / "VOC2010"
    _pair(root / "JPEGImages", root / "SegmentationClassContext", "2008_000001", [[0, 1], [59, 255]])
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    ds = open_segmentation_dataset(root)
    assert ds.name == "context59" and len(ds.class_names) == 59 and ds.background_index is None
    assert ds[0][1].tolist() == [[255, 0], [58, 255]]


def test_cocostuff_layout(tmp_path):
    _pair(tmp_path / "images" / "val2017", tmp_path / "annotations" / "val2017", "000000000139",
          [[0, 170], [255, 3]], mask_suffix="_labelTrainIds.png")
    ds = open_segmentation_dataset(tmp_path)
    assert ds.name == "cocostuff" and len(ds.class_names) == 171
    assert ds[0][1].tolist() == [[0, 170], [255, 3]]


def test_ade20k_layout(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _pair(root / "images" / "validation", root / "annotations" / "validation", "ADE_val_00000001", [[0, 1], [150, 2]])
    ds = open_segmentation_dataset(tmp_path)
    assert ds.name == "ade20k" and len(ds.class_names) == 150
    assert ds[0][1].tolist() == [[255, 0], [149, 1]]


def test_class_lists_have_the_benchmark_sizes_and_no_duplicates():
    for names, n in ((VOC_CLASSES, 21), (CONTEXT59_CLASSES, 59), (COCOSTUFF_CLASSES, 171), (ADE20K_CLASSES, 150)):
        assert len(names) == n and len(set(names)) == n


def test_mismatched_mask_and_corrupt_image_are_data_errors(tmp_path):
    _pair(tmp_path / "images", tmp_path / "masks", "a", [[0, 1, 1]], image_ext=".png")
    Image.new("RGB", (5, 5)).save(tmp_path / "images" / "a.png")  # now 5x5 against a 3x1 mask
    (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    Image.new("L", (2, 2)).save(tmp_path / "masks" / "b.png")
    (tmp_path / "classes.txt").write_text("background\nx\n")
    ds = open_segmentation_dataset(tmp_path)
    with pytest.raises(DataError, match="is 3x1 but its image is 5x5"):
        ds[0]
    with pytest.raises(DataError, match="b.png"):
        ds[1]
