"""Opening images: one place that turns every way a file can be broken into a one-sentence DataError."""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_pacl.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | Path) -> Image.Image:
    """Decode an image fully, upright, as RGB, so that truncation is caught here and not inside a transform."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image {path} does not exist")
    if path.is_dir():
        raise DataError(f"image {path} is a directory, not an image file")
    return _decode(path, str(path))


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """Like load_image, for bytes already in memory (webdataset shards); `name` appears in the error."""
    return _decode(io.BytesIO(data), name)


def _decode(src: Path | IO[bytes], name: str) -> Image.Image:
    try:
        with Image.open(src) as img:
            img.load()
            return _to_rgb(_upright(img))
    except UnidentifiedImageError:
        raise DataError(f"{name} is not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise DataError(f"image {name} has more pixels than Pillow decodes safely (PIL.Image.MAX_IMAGE_PIXELS)") \
            from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {name} is corrupt or truncated ({' '.join(str(e).split())})") from None


def _upright(img: Image.Image) -> Image.Image:
    """Phone photos are often stored sideways with an EXIF tag saying how to turn them."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF metadata must not cost us an otherwise readable image
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing transparency over white (a bare convert() turns transparent pixels black).

    16/32-bit and float greyscale (scientific and medical PNG/TIFF) are scaled to 8 bits first:
    values above 255 are read as 16-bit (0-65535); PIL's own convert would clip them all to white.
    """
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if values.size and values.max() > 255:
            values = values * (255 / 65535)
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def locate_image_dir(data_file: Path, first_image: str, candidates: list[Path], images_dir: Path | None) -> Path:
    """The folder that holds a caption file's images: `images_dir` when given, else the first candidate
    that contains `first_image`. Public datasets ship captions and images in varying layouts; guessing
    the usual ones saves a flag, and failing lists where we looked."""
    if images_dir is not None:
        if not images_dir.is_dir():
            raise DataError(f"--images {images_dir} is not a directory")
        return images_dir
    for folder in candidates:
        if (folder / first_image).is_file():
            return folder
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(f"cannot find the images of {data_file.name} (looked for {first_image} in {looked}); "
                    f"use --images DIR")
