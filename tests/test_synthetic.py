import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_pacl.data import read_caption_rows, read_label_rows
from clip_pacl.data.synthetic import COLORS, SHAPES, ShapeObject, caption_templates, generate_synthetic
from clip_pacl.data.synthetic_kinds import COUNT_WORDS, KINDS, PATTERN_ADJECTIVES, PATTERNS, generate, plural
from clip_pacl_app.cli.main import main


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


# ---------------------------------------------------------------- other kinds (data/synthetic_kinds.py)
def _kind_set(kind, tmp_path_factory):
    out = tmp_path_factory.mktemp(kind)
    return kind, out, generate(kind, out, n=30, seed=4, image_size=48, captions_per_image=2, heldout=10)


@pytest.fixture(scope="module")
def counts_set(tmp_path_factory):
    return _kind_set("counts", tmp_path_factory)


@pytest.fixture(scope="module")
def patterns_set(tmp_path_factory):
    return _kind_set("patterns", tmp_path_factory)


@pytest.fixture(params=["counts", "patterns"])
def kind_set(request):
    return request.getfixturevalue(f"{request.param}_set")


def _near(image, rgb, tol=40):
    return np.abs(image.astype(int) - np.array(rgb)).max(-1) <= tol  # (H, W) bool


def test_kinds_same_seed_same_bytes_and_sets_extend(tmp_path):
    for kind in KINDS:
        a = _all_files(generate(kind, tmp_path / f"{kind}a", n=5, seed=7, image_size=32).out_dir)
        assert a == _all_files(generate(kind, tmp_path / f"{kind}b", n=5, seed=7,
                                                  image_size=32).out_dir)
        other = _all_files(generate(kind, tmp_path / f"{kind}c", n=5, seed=8, image_size=32).out_dir)
        assert a[Path("images/000000.png")] != other[Path("images/000000.png")]
        longer = generate(kind, tmp_path / f"{kind}d", n=3, heldout=4, seed=7, image_size=32).out_dir
        for i in range(5):  # held-out images continue the same stream
            assert (longer / f"images/{i:06d}.png").read_bytes() == a[Path(f"images/{i:06d}.png")]


def test_kinds_heldout_split_and_zero_shot_files(kind_set):
    kind, out, info = kind_set
    classes = (out / "classes.txt").read_text().splitlines()
    assert tuple(classes) == info.label_classes == KINDS[kind][1]
    templates = (out / "templates.txt").read_text().splitlines()
    assert len(templates) > 1 and all(t.count("{}") == 1 for t in templates)
    train, held = read_caption_rows(info.captions), read_caption_rows(info.captions_heldout)
    assert len(train) == 2 * 30 and len(held) == 2 * 10
    assert {r.image.name for r in held} == {f"{i:06d}.png" for i in range(30, 40)}
    assert not {r.image for r in train} & {r.image for r in held}
    labels, held_labels = read_label_rows(info.labels), read_label_rows(info.labels_heldout)
    assert len(labels) == 30 and len(held_labels) == 10 and {r.label for r in labels + held_labels} <= set(classes)
    assert len({r.label for r in labels + held_labels}) > 1


def test_counts_captions_match_what_is_drawn(counts_set):
    _, out, _ = counts_set
    from scipy import ndimage

    for meta in _objects(out):
        image = np.asarray(Image.open(out / meta["image"]))
        word = COUNT_WORDS[meta["count"] - 2]
        assert meta["label"] == word and len(meta["centers"]) == meta["count"]
        for caption in meta["captions"]:
            assert caption.split()[0 if not caption.startswith("a photo") else 3] == word
            assert f"{meta['color']} {plural(meta['shape'])}" in caption
        _, components = ndimage.label(_near(image, COLORS[meta["color"]]))
        assert components == meta["count"], meta  # as many blobs of the caption's colour as the caption says


def test_patterns_captions_match_what_is_drawn(patterns_set):
    _, out, _ = patterns_set
    for meta in _objects(out):
        image = np.asarray(Image.open(out / meta["image"]))
        fg, bg = _near(image, COLORS[meta["foreground"]]), _near(image, COLORS[meta["background"]])
        assert (fg | bg).mean() > 0.75 and 0.1 < fg.mean() and 0.1 < bg.mean()  # two colours, both visible
        assert abs(fg.mean() - meta["coverage"]) < 0.15
        for caption in meta["captions"]:
            assert meta["foreground"] in caption and meta["background"] in caption
            assert meta["pattern"] in caption or PATTERN_ADJECTIVES[meta["pattern"]] in caption


def test_shapes_heldout_keeps_the_training_files(tmp_path):
    plain = generate_synthetic(tmp_path / "plain", n=8, seed=2)
    split = generate_synthetic(tmp_path / "split", n=8, seed=2, heldout=3)
    for name in ("captions.csv", "shapes.csv", "colors.csv"):
        assert (plain.out_dir / name).read_bytes() == (split.out_dir / name).read_bytes()
    assert not list(plain.out_dir.glob("*_heldout.csv"))
    held = read_caption_rows(split.captions_heldout)
    assert {r.image.name for r in held} == {"000008.png", "000009.png", "000010.png"}
    assert split.labels_heldout == split.out_dir / "shapes_heldout.csv"


def test_cli_kinds(tmp_path, capsys):
    from clip_pacl_app.cli.data import KIND_NAMES

    assert KIND_NAMES == ("shapes", *KINDS)
    assert main(["data", "synthetic", "--kind", "patterns", "--out", str(tmp_path / "p"), "--n", "3", "--heldout",
                 "2", "--image-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "patterns" and result["n_heldout"] == 2 and result["label_classes"] == list(PATTERNS)
    assert main(["data", "synthetic", "--out", str(tmp_path / "q"), "--n", "3", "--heldout", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: heldout must be >= 0 (got -1)"
