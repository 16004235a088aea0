"""Opening images: one place that turns every way a file can be broken into a one-sentence DataError.

Images come from users (folders, shards, browser uploads), so decoding is defended here, before any large
allocation: only the formats the project supports are parsed (never EPS/PostScript, which Pillow would hand
to Ghostscript), and the size the header declares is checked against a pixel budget and an aspect-ratio
bound. The aspect bound matters as much as the pixel count: the transforms resize the *shorter* side to
the model's input size, so a 1,000,000 x 1 PNG of 3 KB would ask for a resize of hundreds of gigabytes.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_pacl.errors import ClipPaclError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The decoders Pillow may use (matched to IMAGE_EXTENSIONS); anything else is "not an image".
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow's own warning threshold (about 89 MP, 268 MB as RGB); uploads to the server have a smaller budget.
MAX_IMAGE_PIXELS = 89_478_485
# Longer side over shorter side. Panoramas are about 4-10; beyond this the shorter-side resize explodes.
MAX_ASPECT_RATIO = 20
# Bytes a decode holds besides its images (`decode_cost`): decoder row buffers, the 8-bit scaling's row blocks.
DECODE_OVERHEAD_BYTES = 16 * 2**20
# Values scaled to 8 bits per block of this many (16/32-bit and float greyscale): float64 temporaries stay small.
SCALE_BLOCK_VALUES = 2**19
# `reserve(header_image)` -> a context around the decode (the web server's memory budget, `web/limits.py`).
Reserve = Callable[[Image.Image], contextlib.AbstractContextManager[Any]]


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, reserve: Reserve | None = None,
               then: Callable[[Image.Image], Any] | None = None) -> Any:
    """Decode an image fully, upright, as RGB, so that truncation is caught here and not inside a transform.

    Only a regular file is opened, and opening never blocks: a FIFO or a device named by a path (an index row, a
    table) is refused instead of hanging the reader. `reserve` and `then`: see `decode_image_file`.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except OSError as e:
        raise DataError(f"image {path} cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"image {path} is a directory, not an image file")
    with _open_regular(path) as f:
        return _decode(f, str(path), max_pixels, reserve, then)


def _open_regular(path: Path) -> IO[bytes]:
    """`path` opened for reading without blocking (O_NONBLOCK: a FIFO with no writer does not wait), and only if
    the opened file is a regular one (checked on the descriptor, so a file swapped in after a stat is caught)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"image {path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"image {path} is not a regular file")
    return os.fdopen(fd, "rb")


def decode_image_bytes(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS, reserve: Reserve | None = None,
                       then: Callable[[Image.Image], Any] | None = None) -> Any:
    """Like load_image, for bytes already in memory (shards, uploads); `name` appears in the error."""
    if not data:
        raise DataError(f"{name} is empty")
    return _decode(io.BytesIO(data), name, max_pixels, reserve, then)


def decode_image_file(f: IO[bytes], name: str, max_pixels: int = MAX_IMAGE_PIXELS, reserve: Reserve | None = None,
                      then: Callable[[Image.Image], Any] | None = None) -> Any:
    """Like decode_image_bytes, for a seekable binary file (an upload spooled to disk is not read into memory).

    `reserve(header_image)`, when given, is called once the header is read (size and mode known, no pixel decoded)
    and returns a context that spans the decode and `then`: the web server reserves `decode_cost` bytes of its
    shared budget there (and may refuse). `then(rgb)` reduces the decoded image to what the caller keeps (a
    model input, a thumbnail; never `rgb` itself, which is closed when `then` returns), so that the full-size pixels
    never outlive the reservation; its result is returned.
    """
    f.seek(0, os.SEEK_END)
    empty = f.tell() == 0
    f.seek(0)
    if empty:
        raise DataError(f"{name} is empty")
    return _decode(f, name, max_pixels, reserve, then)


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


def decode_cost(width: int, height: int, mode: str) -> int:
    """An upper bound of the bytes decoding a width x height image of this mode holds at its peak.

    Pillow stores a pixel in 1 byte (L, P, 1), 2 (16-bit greyscale) or 4 (RGB, RGBA, LA, I, F, CMYK, ...). The
    decode holds the decoded image and at most one same-mode copy (a decoder's buffer, the EXIF rotation), then
    the RGB result (4 bytes) and one more 4-byte image (an RGB copy; with transparency, the RGBA image and the
    white background take two), plus DECODE_OVERHEAD_BYTES (row buffers, the 8-bit scaling's row blocks).
    Checked against peak RSS in tests/test_web_limits.py.
    """
    native = 2 if mode.startswith("I;16") else 1 if mode in ("1", "L", "P") else 4
    converted = 16 if mode in ("RGBA", "RGBa", "LA", "La", "PA") or mode == "P" else 8
    return width * height * (2 * native + converted) + DECODE_OVERHEAD_BYTES


def _decode(src: IO[bytes], name: str, max_pixels: int, reserve: Reserve | None,
            then: Callable[[Image.Image], Any] | None) -> Any:
    with _decoding(name):
        img = Image.open(src, formats=SUPPORTED_FORMATS)  # reads the header only
    try:
        check_image_size(*img.size, name, max_pixels)
        with reserve(img) if reserve is not None else contextlib.nullcontext():
            with _decoding(name):
                img.load()
                upright = _upright(img)
                if upright is not img:
                    img.close()  # the stored orientation's copy replaces the decoded image
                rgb = _to_rgb(upright)
                upright.close()
            # The pixels are upright RGB now: drop the metadata, so that no later step turns the image again or
            # parses a malformed EXIF block (getexif() raises SyntaxError, struct.error, ... on one).
            rgb.info.clear()
            if then is None:
                return rgb
            try:
                return then(rgb)
            finally:
                rgb.close()  # the full-size pixels are freed before their reservation is
    finally:
        img.close()


@contextlib.contextmanager
def _decoding(name: str) -> Iterator[None]:
    # A decoder fed hostile bytes can raise nearly anything (struct.error, EOFError, IndexError, SyntaxError,
    # DecompressionBombError, MemoryError, ...): all of them mean "this file is not an image we can read".
    try:
        yield
    except ClipPaclError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name} is not an image file in a supported format ({', '.join(SUPPORTED_FORMATS)})") \
            from None
    except Image.DecompressionBombError as e:  # raised by open() itself, before any pixel is decoded
        raise DataError(f"image {name} declares more pixels than accepted ({' '.join(str(e).split())})") from None
    except Exception as e:  # noqa: BLE001 - see above; the message names the exception's type
        detail = " ".join(str(e).split())
        raise DataError(f"image {name} is corrupt or truncated ({type(e).__name__}: {detail[:200]})") from None


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
        return Image.fromarray(_scaled_to_8_bits(np.asarray(img)), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scaled_to_8_bits(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) when any value is above 255, else v, clipped to 0-255, as uint8: block by block, so
    the float64 working copy is SCALE_BLOCK_VALUES long, not the image's (8 bytes a pixel: 320 MB at 40 MP)."""
    scale = 255 / 65535 if values.size and values.max() > 255 else 1.0
    flat = values.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, len(flat), SCALE_BLOCK_VALUES):
        block = flat[start:start + SCALE_BLOCK_VALUES].astype(np.float64)
        if scale != 1.0:
            block *= scale
        out[start:start + SCALE_BLOCK_VALUES] = np.clip(np.round(block), 0, 255)
    return out.reshape(values.shape)


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
