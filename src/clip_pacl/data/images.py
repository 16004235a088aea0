"""Opening images: one place that turns every way a file can be broken into a one-sentence DataError.

Images come from users (folders, shards, browser uploads), so decoding is defended here, before any large
allocation: only the formats the project supports are parsed (never EPS/PostScript, which Pillow would hand
to Ghostscript), and the size the header declares is checked against a pixel budget and an aspect-ratio
bound. The aspect bound matters as much as the pixel count: the transforms resize the *shorter* side to
the model's input size, so a 1,000,000 x 1 PNG of 3 KB would ask for a resize of hundreds of gigabytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_pacl.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The decoders Pillow may use (matched to IMAGE_EXTENSIONS); anything else is "not an image".
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow's own warning threshold (about 89 MP, 268 MB as RGB); uploads to the server have a smaller budget.
MAX_IMAGE_PIXELS = 89_478_485
# Longer side over shorter side. Panoramas are about 4-10; beyond this the shorter-side resize explodes.
MAX_ASPECT_RATIO = 20


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully, upright, as RGB, so that truncation is caught here and not inside a transform."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image {path} does not exist")
    if path.is_dir():
        raise DataError(f"image {path} is a directory, not an image file")
    return _decode(path, str(path), max_pixels)


def decode_image_bytes(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Like load_image, for bytes already in memory (shards, uploads); `name` appears in the error."""
    if not data:
        raise DataError(f"{name} is empty")
    return _decode(io.BytesIO(data), name, max_pixels)


def check_image_size(width: int, height: int, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse sizes whose decode or shorter-side resize would need more memory than a sane image does."""
    if width < 1 or height < 1:
        raise DataError(f"image {name} is {width}x{height}: it has no pixels")
    if width * height > max_pixels:
        raise DataError(f"image {name} is {width}x{height}, more than the {max_pixels / 1e6:.0f} megapixels "
                        f"accepted")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(f"image {name} is {width}x{height}; images more than {MAX_ASPECT_RATIO} times wider "
                        f"than tall (or taller than wide) are not accepted")


def _decode(src: Path | IO[bytes], name: str, max_pixels: int) -> Image.Image:
    # A decoder fed hostile bytes can raise nearly anything (struct.error, EOFError, IndexError, SyntaxError,
    # DecompressionBombError, MemoryError, ...): all of them mean "this file is not an image we can read".
    try:
        with Image.open(src, formats=SUPPORTED_FORMATS) as img:  # reads the header only
            check_image_size(*img.size, name, max_pixels)
            img.load()
            rgb = _to_rgb(_upright(img))
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name} is not an image file in a supported format ({', '.join(SUPPORTED_FORMATS)})") \
            from None
    except Image.DecompressionBombError as e:  # raised by open() itself, before any pixel is decoded
        raise DataError(f"image {name} declares more pixels than accepted ({' '.join(str(e).split())})") from None
    except Exception as e:  # noqa: BLE001 - see above; the message names the exception's type
        detail = " ".join(str(e).split())
        raise DataError(f"image {name} is corrupt or truncated ({type(e).__name__}: {detail[:200]})") from None
    # The pixels are upright RGB now: drop the metadata, so that no later step turns the image again or
    # parses a malformed EXIF block (getexif() raises SyntaxError, struct.error, ... on one).
    rgb.info.clear()
    return rgb


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
