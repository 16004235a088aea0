"""Readers: every caption format, label tables, column errors, image-folder discovery, splits."""

import json

import numpy as np
import pytest
from PIL import Image

from clip_pacl.data import (
    CaptionRow,
    LabelRow,
    load_image,
    read_caption_rows,
    read_label_rows,
    resolve_data_path,
    split_by_image,
)
from clip_pacl.errors import DataError


def _png(path, color=(200, 10, 10), size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _pairs(rows):
    return [(row.image.name, row.caption) for row in rows]


EXPECTED = [("a.png", "a red square"), ("b.png", "a, quoted caption"), ("a.png", "another caption for a")]


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, delimiter):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    body = [f"image{delimiter}caption", f"imgs/a.png{delimiter}a red square",
            f'imgs/b.png{delimiter}"a, quoted caption"', f"imgs/a.png{delimiter} another caption for a "]
    data = tmp_path / f"data{suffix}"
    data.write_text("\n".join(body) + "\n")
    rows = read_caption_rows(data)
    assert _pairs(rows) == EXPECTED
    assert rows[0].image == tmp_path / "imgs" / "a.png"  # relative to the data file's folder
    assert rows[0].image == rows[2].image  # several captions of one image: rows sharing the image


def test_jsonl_custom_keys_caption_lists_and_absolute_paths(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    lines = [{"img": "a.png", "text": "a red square"}, {"img": str(b), "text": "a, quoted caption"},
             {"img": "a.png", "text": ["another caption for a"]}]
    data = tmp_path / "sub" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_caption_rows(data, image_key="img", caption_key="text", images_dir=tmp_path)
    assert _pairs(rows) == EXPECTED and rows[0].image == a and rows[1].image == b


def test_json_list_and_forced_format(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "rows.json").write_text(json.dumps([{"image": "a.png", "caption": "a red square"}]))
    assert _pairs(read_caption_rows(tmp_path / "rows.json")) == [("a.png", "a red square")]
    (tmp_path / "rows.dat").write_text("image,caption\na.png,a red square\n")
    with pytest.raises(DataError, match="cannot tell the format of rows.dat.*--data-format"):
        read_caption_rows(tmp_path / "rows.dat")
    assert _pairs(read_caption_rows(tmp_path / "rows.dat", data_format="csv")) == [("a.png", "a red square")]


def test_directory_with_a_caption_table_reads_it(tmp_path):
    _png(tmp_path / "images" / "a.png")
    (tmp_path / "captions.csv").write_text("image,caption\nimages/a.png,a red square\n")
    assert resolve_data_path(tmp_path) == (tmp_path / "captions.csv", "csv")
    assert _pairs(read_caption_rows(tmp_path)) == [("a.png", "a red square")]


def test_wrong_column_names_fail_before_any_work(tmp_path):
    (tmp_path / "data.csv").write_text("picture,words\nmissing.png,a caption\n")
    with pytest.raises(DataError) as e:  # every missing column in one line, with the columns the file has
        read_caption_rows(tmp_path / "data.csv")
    assert str(e.value) == ("data.csv has no image column (image / filepath / image_path / img / file_name / filename "
                            "/ path) and no caption column (caption / title / text / captions / sentence) (columns: "
                            "picture, words); use --image-key and --caption-key")
    with pytest.raises(DataError) as e:
        read_caption_rows(tmp_path / "data.csv", image_key="picture", caption_key="text")
    assert str(e.value) == "data.csv has no column 'text' (columns: picture, words); use --caption-key"
    (tmp_path / "labels.jsonl").write_text('{"image": "a.png", "kind": "cat"}\n')
    with pytest.raises(DataError) as e:
        read_label_rows(tmp_path / "labels.jsonl")
    assert str(e.value) == ("labels.jsonl has no label column (label / class / category / class_name) "
                            "(columns: image, kind); use --label-key")


@pytest.mark.parametrize("header, row", [
    ("filepath,title", "a.png,a red square"),  # open_clip's CSV defaults
    ("image_path,text", "a.png,a red square"),
    ("img,caption", "a.png,a red square"),
])
def test_common_column_names_are_recognised(tmp_path, header, row):
    _png(tmp_path / "a.png")
    (tmp_path / "data.csv").write_text(f"{header}\n{row}\n")
    assert _pairs(read_caption_rows(tmp_path / "data.csv")) == [("a.png", "a red square")]
    (tmp_path / "labels.csv").write_text("filepath,class\na.png,cat\n")
    assert [(r.image.name, r.label) for r in read_label_rows(tmp_path / "labels.csv")] == [("a.png", "cat")]


def test_an_explicit_key_is_not_replaced_by_an_alias(tmp_path):
    (tmp_path / "data.csv").write_text("filepath,title,caption\na.png,the title,the caption\n")
    _png(tmp_path / "a.png")
    assert _pairs(read_caption_rows(tmp_path / "data.csv")) == [("a.png", "the caption")]  # the default first
    assert _pairs(read_caption_rows(tmp_path / "data.csv", caption_key="title")) == [("a.png", "the title")]


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "data path .*missing.csv does not exist"),
    ("empty.csv", "", "data file .*empty.csv is empty"),
    ("header.csv", "image,caption\n", "data file .*header.csv has no rows"),
    ("blank.csv", "image,caption\na.png,   \n", "blank.csv line 2 has an empty caption"),
    ("bad.jsonl", '{"image": "a.png", "caption": "x"}\n{not json\n', "bad.jsonl line 2 is not valid JSON"),
    ("list.jsonl", '["a.png", "x"]\n', "list.jsonl line 1 is not a JSON object"),
])
def test_broken_files_are_one_clear_error(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_caption_rows(tmp_path / name)


def test_label_rows(tmp_path):
    (tmp_path / "labels.tsv").write_text("image\tlabel\nx/a.png\tcat\nx/b.png\t dog \n")
    assert read_label_rows(tmp_path / "labels.tsv") == [LabelRow(tmp_path / "x" / "a.png", "cat"),
                                                        LabelRow(tmp_path / "x" / "b.png", "dog")]


def _coco(tmp_path, layout):
    images = [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 9, "file_name": "000000000009.jpg"}]
    annotations = [{"image_id": 7, "id": 1, "caption": "A man riding\n a horse. "},
                   {"image_id": 9, "id": 2, "caption": "Two dogs."}, {"image_id": 7, "id": 3, "caption": "A horse."}]
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    image_dir = {"beside_annotations": tmp_path / "val2017", "images_split": tmp_path / "images" / "val2017",
                 "custom": tmp_path / "elsewhere"}[layout]
    for img in images:
        _png(image_dir / img["file_name"])
    return ann, image_dir


@pytest.mark.parametrize("layout", ["beside_annotations", "images_split"])
def test_coco_captions_find_their_images(tmp_path, layout):
    ann, image_dir = _coco(tmp_path, layout)
    rows = read_caption_rows(ann)
    assert rows == [CaptionRow(image_dir / "000000000007.jpg", "A man riding a horse."),
                    CaptionRow(image_dir / "000000000009.jpg", "Two dogs."),
                    CaptionRow(image_dir / "000000000007.jpg", "A horse.")]


def test_coco_images_flag_and_missing_images(tmp_path):
    ann, image_dir = _coco(tmp_path, "custom")
    with pytest.raises(DataError, match="cannot find the images of captions_val2017.json .*use --images DIR"):
        read_caption_rows(ann)
    assert read_caption_rows(ann, images_dir=image_dir)[1].image == image_dir / "000000000009.jpg"
    (tmp_path / "not_coco.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="not_coco.json is not a COCO captions file"):
        read_caption_rows(tmp_path / "not_coco.json")


FLICKR_CSV = "image,caption\n1000_a.jpg,A child in a pink dress , climbing stairs .\n1000_a.jpg,A girl going up.\n" \
             "2000_b.jpg,A dog runs .\n"
FLICKR_TOKEN = "1000_a.jpg#0\tA child in a pink dress , climbing stairs .\n1000_a.jpg#1\tA girl going up.\n" \
               "2000_b.jpg#0\tA dog runs .\n"
FLICKR_PIPE = "image_name| comment_number| comment\n1000_a.jpg| 0| A child in a pink dress , climbing stairs .\n" \
              "1000_a.jpg| 1| A girl going up.\n2000_b.jpg| 0| A dog runs .\n"


@pytest.mark.parametrize("name, text, image_folder", [
    ("captions.txt", FLICKR_CSV, "Images"),  # Kaggle Flickr8k
    ("Flickr8k_text/Flickr8k.token.txt", FLICKR_TOKEN, "Flicker8k_Dataset"),  # original Flickr8k, sibling folders
    ("results.csv", FLICKR_PIPE, "flickr30k_images"),  # Kaggle Flickr30k
])
def test_flickr_layouts(tmp_path, name, text, image_folder):
    data = tmp_path / name
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(text)
    _png(tmp_path / image_folder / "1000_a.jpg")
    _png(tmp_path / image_folder / "2000_b.jpg")
    rows = read_caption_rows(data)
    assert _pairs(rows) == [("1000_a.jpg", "A child in a pink dress , climbing stairs ."),
                            ("1000_a.jpg", "A girl going up."), ("2000_b.jpg", "A dog runs .")]
    assert rows[0].image == tmp_path / image_folder / "1000_a.jpg"
    assert _pairs(read_caption_rows(data, data_format="flickr")) == _pairs(rows)


def test_flickr_directory_and_bad_lines(tmp_path):
    (tmp_path / "captions.txt").write_text(FLICKR_CSV)
    _png(tmp_path / "Images" / "1000_a.jpg")
    assert len(read_caption_rows(tmp_path)) == 3
    (tmp_path / "bad.token.txt").write_text("1000_a.jpg#0\tfine\nno tab here\n")
    with pytest.raises(DataError, match="bad.token.txt line 2 is not 'name.jpg#N<TAB>caption'"):
        read_caption_rows(tmp_path / "bad.token.txt")


def test_image_folder_with_sidecar_captions(tmp_path):
    _png(tmp_path / "b" / "dog.jpg")
    (tmp_path / "b" / "dog.txt").write_text("a dog\n\na brown dog\n")
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square")
    _png(tmp_path / "uncaptioned.png")
    rows = read_caption_rows(tmp_path)
    assert _pairs(rows) == [("a.png", "a red square"), ("dog.jpg", "a dog"), ("dog.jpg", "a brown dog")]
    empty = tmp_path / "empty"
    _png(empty / "x.png")
    with pytest.raises(DataError, match="has 1 images but no caption files beside them"):
        read_caption_rows(empty)


def test_unknown_format_flag(tmp_path):
    with pytest.raises(DataError, match="unknown --data-format 'parquet'"):
        read_caption_rows(tmp_path, data_format="parquet")


def test_split_by_image_never_leaks_and_is_seeded():
    rows = [CaptionRow(f"img{i % 10}.png", f"caption {i}") for i in range(40)]  # 10 images x 4 captions
    train, val = split_by_image(rows, 0.3, seed=1)
    train_images, val_images = {r.image for r in train}, {r.image for r in val}
    assert not train_images & val_images
    assert len(val_images) == 3 and len(train) + len(val) == 40 and len(val) == 12
    assert [r for r in rows if r in train] == train  # order kept
    assert split_by_image(rows, 0.3, seed=1) == (train, val)
    assert split_by_image(rows, 0.3, seed=2) != (train, val)
    assert split_by_image(rows[:8], 0.01)[1]  # a positive fraction always holds out at least one image
    assert split_by_image(rows, 0.0) == (rows, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_image(rows, 1.0)


def test_load_image_errors_and_transparency(tmp_path):
    rgba = _png(tmp_path / "t.png", color=(0, 0, 0, 0), mode="RGBA")
    assert load_image(rgba).mode == "RGB" and load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_png(tmp_path / "g.png", color=128, mode="L")).getpixel((1, 1)) == (128, 128, 128)
    (tmp_path / "text.png").write_text("not an image")
    truncated = tmp_path / "trunc.jpg"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path, message in [(tmp_path / "nope.png", "does not exist"), (tmp_path / "text.png", "is not an image file"),
                          (truncated, "is corrupt or truncated"), (tmp_path, "is a directory")]:
        with pytest.raises(DataError, match=message):
            load_image(path)


def test_load_image_turns_exif_rotated_photos_upright(tmp_path):
    wide = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = wide.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    wide.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (10, 20)


def test_windows_csv_with_byte_order_mark_and_multiline_caption(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "data.csv").write_bytes('\ufeffimage,caption\r\na.png,"two\r\nlines"\r\na.png,plain\r\n'.encode())
    assert _pairs(read_caption_rows(tmp_path / "data.csv")) == [("a.png", "two\nlines"), ("a.png", "plain")]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    deep = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (128, 128, 128)
