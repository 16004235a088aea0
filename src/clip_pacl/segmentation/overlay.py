"""Pictures of a segmentation: a label-mask PNG and a colour overlay with a legend, drawn with PIL only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clip_pacl.data.synthetic import COLORS
from clip_pacl.segmentation.predict import NO_CLASS

# Distinct, saturated colours (Glasbey-like); classes beyond this list cycle through it.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
BACKGROUND_COLOR = (40, 40, 40)
MIN_OVERLAY_SIDE = 256  # small images are enlarged (nearest) so the overlay and its legend are readable


# A class named after a basic colour is drawn in that colour, so "red" is never shown blue in the legend
# (the built-in synthetic set's colours, as drawn, plus a few more).
NAMED_COLORS = {
    **COLORS, "pink": (250, 150, 190), "brown": (130, 80, 30), "gray": (128, 128, 128), "grey": (128, 128, 128),
}


def class_colors(class_names: Sequence[str]) -> list[tuple[int, int, int]]:
    """One colour per class: "background" is dark grey so objects stand out, a colour word is its colour,
    anything else takes the next palette colour."""
    colors, k = [], 0
    for name in class_names:
        key = name.strip().lower()
        if key == "background":
            colors.append(BACKGROUND_COLOR)
        elif key in NAMED_COLORS:
            colors.append(NAMED_COLORS[key])
        else:
            colors.append(PALETTE[k % len(PALETTE)])
            k += 1
    return colors


def mask_image(label_map: np.ndarray) -> Image.Image:
    """The label map as an 8-bit PNG-ready image: pixel = class index (255 = unassigned)."""
    if label_map.max(initial=0) > 255:
        raise ValueError("more than 255 classes do not fit in an 8-bit mask")
    return Image.fromarray(label_map.astype(np.uint8), mode="L")


def overlay_image(
    image: Image.Image,
    label_map: np.ndarray,
    class_names: Sequence[str],
    fractions: dict[str, float] | None = None,
    alpha: float = 0.55,
    legend: bool = True,
) -> Image.Image:
    """The image blended with one colour per class, and a legend (colour, name, share of pixels) on the right.

    Only classes present in the map are listed. Unassigned pixels keep the image's own colours. `legend=False`
    gives the blended image alone (the web page draws its legend in HTML, from `class_colors`).
    """
    colors = np.array([*class_colors(class_names)], dtype=np.float32).reshape(-1, 3)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    assigned = label_map != NO_CLASS
    tint = colors[np.where(assigned, label_map, 0)]  # (H, W, 3)
    blended = np.where(assigned[..., None], (1 - alpha) * rgb + alpha * tint, rgb)
    picture = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    scale = max(1, -(-MIN_OVERLAY_SIDE // max(1, min(picture.size))))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if not legend:
        return picture
    present = [i for i in np.unique(label_map) if i != NO_CLASS and i < len(class_names)]
    return _with_legend(picture, [(class_names[i], tuple(int(c) for c in colors[i])) for i in present], fractions)


def _with_legend(picture: Image.Image, entries: list[tuple[str, tuple[int, ...]]],
                 fractions: dict[str, float] | None) -> Image.Image:
    """`picture` with a white column on its right listing (colour swatch, name, share) for each entry."""
    font = ImageFont.load_default()
    row, swatch, pad = 16, 12, 8
    labels = [f"{name}  {100 * fractions[name]:.1f}%" if fractions else name for name, _ in entries]
    probe = ImageDraw.Draw(picture)
    text_w = max((probe.textlength(t, font=font) for t in labels), default=0)
    legend_w = int(pad * 3 + swatch + text_w)
    height = max(picture.height, pad * 2 + row * len(entries))
    canvas = Image.new("RGB", (picture.width + legend_w, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, ((_, color), text) in enumerate(zip(entries, labels)):
        x, y = picture.width + pad, pad + k * row
        draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), text, fill=(0, 0, 0), font=font)
    return canvas
