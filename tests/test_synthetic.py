import json
import math

import numpy as np
import pytest
from PIL import Image

from clip_pacl.cli.main import main
from clip_pacl.data import read_caption_rows, read_label_rows
from clip_pacl.data.synthetic import COLORS, SHAPES, ShapeObject, caption_templates, generate_synthetic


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    info = generate_synthetic(out, n=40, seed=3, image_size=64, captions_per_image=2)
    return out, info


def _objects(out):
    return [json.loads(line) for line in (out / "objects.jsonl").read_text().splitlines()]


def _all_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_sets_extend(tmp_path):
    a = _all_files(generate_synthetic(tmp_path / "a", n=6, seed=7).out_dir)
    b = _all_files(generate_synthetic(tmp_path / "b", n=6, seed=7).out_dir)
    assert a == b
    other = _all_files(generate_synthetic(tmp_path / "c", n=6, seed=8).out_dir)
    name = next(k for k in a if k.suffix == ".png")
    assert a[name] != other[name]
    longer = generate_synthetic(tmp_path / "d", n=9, seed=7).out_dir
    for i in range(6):  # image i depends only on (seed, i): a bigger set starts with the smaller one
        name = f"images/{i:06d}.png"
        assert (longer / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def test_layout_and_readers(synthetic):
    out, info = synthetic
    objects = _objects(out)
    assert len(objects) == info.n_images == 40
    captions = read_caption_rows(out / "captions.csv")
    assert len(captions) == 2 * 40  # two phrasings per image, as separate rows
    assert all(row.image.is_file() for row in captions)
    shapes, colors = read_label_rows(out / "shapes.csv"), read_label_rows(out / "colors.csv")
    single = [o for o in objects if len(o["objects"]) == 1]
    assert len(shapes) == len(colors) == len(single) == info.n_single_object > 0
    for shape_row, color_row, meta in zip(shapes, colors, single):
        assert shape_row.image == color_row.image == out / meta["image"]
        assert shape_row.label == meta["objects"][0]["shape"] and color_row.label == meta["objects"][0]["color"]
    classes = (out / "segmentation" / "classes.txt").read_text().splitlines()
    assert classes == ["background", *SHAPES] == list(info.classes)
    for meta in objects[:5]:
        seg_image = out / "segmentation" / meta["image"]
        assert seg_image.read_bytes() == (out / meta["image"]).read_bytes()
        assert not seg_image.is_symlink()


def test_every_caption_mentions_every_object(synthetic):
    out, _ = synthetic
    n_objects = set()
    for meta in _objects(out):
        n_objects.add(len(meta["objects"]))
        assert len(meta["captions"]) == 2 and meta["captions"][0] != meta["captions"][1]
        for caption in meta["captions"]:
            for obj in meta["objects"]:
                assert f"{obj['color']} {obj['shape']}" in caption, (caption, obj)
    assert n_objects == {1, 2, 3}


def test_relations_follow_geometry():
    red = ShapeObject("circle", "red", "small", (10.0, 5.0), 4.0, COLORS["red"])
    blue = ShapeObject("square", "blue", "small", (12.0, 40.0), 4.0, COLORS["blue"])
    green = ShapeObject("star", "green", "small", (50.0, 42.0), 4.0, COLORS["green"])
    two = caption_templates([red, blue], "noise", 64)
    assert "a red circle above a blue square" in two and "a blue square below a red circle" in two
    three = caption_templates([red, blue, green], "stripes", 64)
    assert "a red circle above a blue square, and a green star to the right of the square" in three
    orange = ShapeObject("heart", "orange", "large", (32.0, 32.0), 10.0, COLORS["orange"])
    assert "an orange heart" in caption_templates([orange], "gradient", 64)


def test_masks_agree_with_drawn_pixels(synthetic):
    out, _ = synthetic
    for meta in _objects(out)[:20]:
        image = np.asarray(Image.open(out / meta["image"]))  # (H, W, 3)
        mask = np.asarray(Image.open(out / "segmentation" / "masks" / meta["image"].split("/")[-1]))  # (H, W)
        assert mask.shape == image.shape[:2]
        yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
        near_any = np.zeros(mask.shape, bool)
        for obj in meta["objects"]:
            class_id = list(SHAPES).index(obj["shape"]) + 1
            dist = np.hypot(xx - obj["center"][0], yy - obj["center"][1])
            inside = (mask == class_id) & (dist <= obj["radius"] + 1)
            assert inside.sum() > 0.2 * math.pi * obj["radius"] ** 2  # the object is labelled where it is drawn
            assert (image[inside] == obj["rgb"]).all()  # labelled pixels have exactly the object's colour
            assert (mask[dist < 0.3 * obj["radius"]] == class_id).all()  # its core is never background
            near_any |= dist <= obj["radius"] + 1.5
        assert (mask[~near_any] == 0).all()  # far from every object: background
        assert set(np.unique(mask[near_any])) <= {0, 255} | {list(SHAPES).index(o["shape"]) + 1
                                                                for o in meta["objects"]}


def test_colour_masks_label_the_same_pixels_by_colour(synthetic):
    out, info = synthetic
    colors = list(COLORS)
    assert (out / "segmentation_colors" / "classes.txt").read_text().splitlines() == ["background", *colors]
    assert info.segmentation_colors == out / "segmentation_colors"
    # prompt templates: shape classes are described with every colour, colour classes with every shape
    shape_templates = (out / "segmentation" / "templates.txt").read_text().splitlines()
    color_templates = (out / "segmentation_colors" / "templates.txt").read_text().splitlines()
    assert "an orange {}" in shape_templates and len(shape_templates) == len(colors)
    assert "a {} star" in color_templates and len(color_templates) == len(SHAPES)
    for meta in _objects(out)[:20]:
        name = meta["image"].split("/")[-1]
        by_shape = np.asarray(Image.open(out / "segmentation" / "masks" / name))
        by_colour = np.asarray(Image.open(out / "segmentation_colors" / "masks" / name))
        assert ((by_shape == 0) == (by_colour == 0)).all() and ((by_shape == 255) == (by_colour == 255)).all()
        assert (out / "segmentation_colors" / "images" / name).read_bytes() == (out / meta["image"]).read_bytes()
        for obj in meta["objects"]:  # every pixel labelled with this object's shape carries its colour id
            same_shape = [o for o in meta["objects"] if o["shape"] == obj["shape"]]
            if len(same_shape) == 1:
                pixels = by_colour[by_shape == list(SHAPES).index(obj["shape"]) + 1]
                assert pixels.size > 0 and (pixels == colors.index(obj["color"]) + 1).all()


def test_object_colours_stand_out_from_backgrounds(synthetic):
    out, _ = synthetic
    for meta in _objects(out)[:20]:
        image = np.asarray(Image.open(out / meta["image"])).astype(int)
        mask = np.asarray(Image.open(out / "segmentation" / "masks" / meta["image"].split("/")[-1]))
        background = image[mask == 0]  # (P, 3)
        saturation = background.max(1) - background.min(1)
        assert saturation.mean() < 60 and 50 < background.mean() < 200  # muted, mid-grey


def test_cli_json_and_bad_arguments(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path / "s"), "--n", "4", "--seed", "2",
                 "--image-size", "32", "--max-objects", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_images"] == 4 and result["n_single_object"] == 4 and result["image_size"] == 32
    assert Image.open(tmp_path / "s" / "images" / "000003.png").size == (32, 32)
    assert main(["data", "synthetic", "--out", str(tmp_path / "t"), "--n", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: the synthetic set needs at least 1 image (got n=0)"
