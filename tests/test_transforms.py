"""Eval preprocessing equals open_clip's pixel for pixel; training crops are seeded, in range and torchvision's."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from clip_pacl.config import CLIPConfig
from clip_pacl.transforms import OPENAI_MEAN, OPENAI_STD, image_transform, random_resized_crop_box
from helpers import require

open_clip = require("open_clip")
skimage_data = require("skimage.data")

SIZES = [224, 64, 288, 336]


def real_images() -> dict[str, Image.Image]:
    images = {name: Image.fromarray(getattr(skimage_data, name)()) for name in
              ["astronaut", "coffee", "chelsea", "camera", "rocket", "logo", "page", "text"]}
    assert images["camera"].mode == "L" and images["logo"].mode == "RGBA"
    astronaut = skimage_data.astronaut()
    images["tiny"] = Image.fromarray(astronaut[100:107, 200:205])  # 5 x 7: upsampled
    images["wide"] = Image.fromarray(astronaut[:37])  # 512 x 37
    images["tall"] = Image.fromarray(astronaut[:, :101])
    return images


IMAGES = real_images()


@pytest.fixture(scope="module")
def open_clip_preprocess(tmp_path_factory):
    """open_clip's eval preprocess exactly as create_model_and_transforms builds it (tiny model: cheap to create)."""
    model_dir = tmp_path_factory.mktemp("open_clip_tiny")
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": CLIPConfig.from_name("tiny").to_open_clip_dict()})
    )
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that there are no pretrained weights
    try:
        return {
            size: open_clip.create_model_and_transforms(f"local-dir:{model_dir}", load_weights=False,
                                                        force_image_size=size)[2]
            for size in SIZES
        }
    finally:
        root.setLevel(level)


@pytest.mark.parametrize("size", SIZES)
def test_eval_equals_open_clip(open_clip_preprocess, size):
    ours = image_transform(size)
    for name, image in IMAGES.items():
        expected = open_clip_preprocess[size](image)
        result = ours(image)
        assert result.shape == (3, size, size) and result.dtype == torch.float32
        assert torch.allclose(result, expected, atol=1e-5, rtol=0), name


def test_eval_normalises_with_clip_statistics():
    grey = Image.new("RGB", (80, 60), (128, 128, 128))
    result = image_transform(32)(grey)
    expected = (128 / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(result, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-6)
    assert torch.allclose(image_transform(32, mean=(0.5,) * 3, std=(0.5,) * 3)(grey), torch.full((3, 32, 32),
                          (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_modes_pil_cannot_interpolate_are_converted_first(open_clip_preprocess):
    """Palette / 1-bit / 16-bit images give what open_clip gives for the same picture as RGB / 8-bit grayscale."""
    transform, reference = image_transform(64), open_clip_preprocess[64]
    rgb = IMAGES["chelsea"]
    palette = rgb.quantize(64)
    assert torch.allclose(transform(palette), reference(palette.convert("RGB")), atol=1e-5)
    assert not torch.allclose(reference(palette), reference(palette.convert("RGB")), atol=1e-2)  # nearest-neighbour

    bits = Image.fromarray(skimage_data.horse())
    assert bits.mode == "1"
    assert torch.allclose(transform(bits), reference(bits.convert("L")), atol=1e-5)

    gray8 = np.asarray(IMAGES["camera"])
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)  # 0..65535
    assert gray16.mode.startswith("I")
    assert torch.allclose(transform(gray16), reference(IMAGES["camera"]), atol=1e-5)

    cmyk = rgb.convert("CMYK")
    assert torch.allclose(transform(cmyk), reference(cmyk.convert("RGB")), atol=1e-5)


def test_exif_orientation_is_applied():
    wide = IMAGES["coffee"]  # 600 x 400
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG", exif=exif.tobytes())
    stored = Image.open(io.BytesIO(buffer.getvalue()))
    upright = wide.transpose(Image.Transpose.ROTATE_270)
    transform = image_transform(64)
    assert torch.allclose(transform(stored), transform(upright), atol=1e-6)
    assert not torch.allclose(transform(stored), transform(wide), atol=1e-2)


def test_train_transform_is_deterministic_with_a_generator():
    image = IMAGES["astronaut"]
    first = image_transform(64, train=True, generator=torch.Generator().manual_seed(3))
    second = image_transform(64, train=True, generator=torch.Generator().manual_seed(3))
    a = [first(image) for _ in range(4)]
    b = [second(image) for _ in range(4)]
    assert all(x.shape == (3, 64, 64) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # successive calls draw new crops
    other = image_transform(64, train=True, generator=torch.Generator().manual_seed(4))(image)
    assert not torch.equal(a[0], other)


def test_train_transform_equals_open_clip_for_the_same_global_seed():
    """Without a generator the draws come from torch's global RNG in torchvision's order: open_clip's crops."""
    reference = open_clip.image_transform(64, is_train=True)
    ours = image_transform(64, train=True)
    for name in ["astronaut", "coffee", "camera", "tiny", "wide"]:
        torch.manual_seed(11)
        expected = reference(IMAGES[name])
        torch.manual_seed(11)
        assert torch.allclose(ours(IMAGES[name]), expected, atol=1e-5), name


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.3, 0.5)])
def test_random_crop_box_respects_scale_and_ratio(scale):
    generator = torch.Generator().manual_seed(0)
    width, height = 500, 480
    fractions = []
    for _ in range(300):
        top, left, crop_h, crop_w = random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), generator)
        assert 0 <= top and top + crop_h <= height and 0 <= left and left + crop_w <= width
        assert 3 / 4 - 0.02 <= crop_w / crop_h <= 4 / 3 + 0.02
        fractions.append(crop_h * crop_w / (width * height))
    assert scale[0] - 0.01 <= min(fractions) and max(fractions) <= scale[1] + 0.01
    assert max(fractions) - min(fractions) > 0.5 * (scale[1] - scale[0])  # the range is used, not one value


def test_random_crop_box_falls_back_to_a_central_crop():
    """A 0.9-1.0 area crop with aspect ratio <= 4/3 cannot fit in a 3:2 photo: torchvision's central 4:3 crop."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert random_resized_crop_box(640, 427, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (0, 35, 427, 569)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        image_transform(0)
    with pytest.raises(ValueError, match="scale"):
        image_transform(64, train=True, scale=(0.0, 1.0))
