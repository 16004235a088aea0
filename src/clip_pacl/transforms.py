"""PIL image -> normalised (3, H, W) float tensor, as CLIP was trained and evaluated; no torchvision needed.

Evaluation reproduces open_clip's preprocess (torchvision ``Resize(size, BICUBIC)`` on a PIL image, ``CenterCrop``,
``ToTensor``, ``Normalize``) pixel for pixel: same output-size rounding, the same PIL bicubic resampling, the same crop
offsets. Training uses a random resized crop with torchvision's parameter sampling (open_clip's default scale 0.9-1.0,
aspect ratio 3/4-4/3), drawn from an optional ``torch.Generator`` so a data pipeline can be made deterministic.

Image modes: RGB, L (grayscale), RGBA and LA are resized in their own mode and then converted to RGB, exactly as
open_clip does (PIL resizes RGBA with premultiplied alpha; the alpha channel is then dropped, not composited). Modes
PIL cannot interpolate are converted first, where open_clip's output would be poor: palette (P/PA, which PIL would
resize with nearest-neighbour) becomes RGB/RGBA, 1-bit becomes L, 16/32-bit integer and float images are scaled to
8-bit (values above 255 are read as 16-bit, 0-65535), CMYK/YCbCr/LAB/HSV become RGB. Photos whose EXIF orientation
says they are rotated are turned upright first (``exif_transpose=True``); open_clip does not, so only those differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_EXIF_ORIENTATION = 0x0112
_RESIZABLE_MODES = ("RGB", "RGBA", "L", "LA")


def _prepare(image: Image.Image, exif_transpose: bool) -> Image.Image:
    """Upright image in a mode PIL can resample with bicubic (see the module docstring)."""
    if exif_transpose and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _RESIZABLE_MODES:
        return image
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith(("I", "F")):
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        if values.max(initial=0) > 255:
            values = values * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: short side -> size, long side -> int(size * long / short)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)  # (W, H)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)``: offsets rounded half to even, zero padding if the image is smaller."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        left, top = max(size - width, 0) // 2, max(size - height, 0) // 2
        padded.paste(image, (left, top))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    if (left, top, width, height) == (0, 0, size, size):
        return image
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` (same draws, so the same crops for the same RNG state): a box of
    ``scale`` x the image area and aspect ratio log-uniform in ``ratio``, 10 tries, else a central crop.
    Returns (top, left, crop_height, crop_width)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item())
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class ImageTransform:
    """Callable PIL image -> (3, image_size, image_size) float32 tensor; a class (not a closure) so that data loader
    workers can pickle it.

    Training crops: with ``generator=None`` they are drawn from torch's global RNG, which a DataLoader seeds
    differently in each worker from its own generator (reproducible when that is seeded). An explicit ``generator``
    is copied into every worker as is, so reseed ``transform.generator`` per worker (``worker_init_fn``)."""

    def __init__(
        self,
        image_size: int,
        train: bool = False,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
        exif_transpose: bool = True,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.image_size = image_size
        self.train = train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = scale
        self.ratio = ratio
        self.generator = generator
        self.exif_transpose = exif_transpose

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _prepare(image, self.exif_transpose)
        size = self.image_size
        if self.train:
            top, left, height, width = random_resized_crop_box(*image.size, self.scale, self.ratio, self.generator)
            image = image.crop((left, top, left + width, top + height))
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:
            image = center_crop(resize_shortest_side(image, size), size)
        pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))  # (H, W, 3)
        return pixels.permute(2, 0, 1).float().div_(255).sub_(self.mean).div_(self.std)  # (3, H, W)

    def __repr__(self) -> str:
        kind = f"train, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}" if self.train else "eval"
        return f"ImageTransform(image_size={self.image_size}, {kind})"


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    scale: tuple[float, float] = (0.9, 1.0),
    generator: torch.Generator | None = None,
) -> ImageTransform:
    """CLIP's eval preprocess (``train=False``) or training augmentation (``train=True``) for one image size."""
    return ImageTransform(image_size, train=train, mean=mean, std=std, scale=scale, generator=generator)

