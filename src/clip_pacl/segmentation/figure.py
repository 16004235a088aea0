"""A side-by-side segmentation figure: image | ground truth | one column per method, one row per image (PIL only).

Every method segments with the dataset's class names only (the same call as `clip-pacl eval segmentation`), each
with its own background rule: "auto" (the label-free rule `clip-pacl segment` uses by default), another rule name,
a cosine threshold, or None (the background prompt competes). Classes named after a colour are drawn in it, as in
every overlay; when all of them are, background is mid-grey and ignored edge pixels cyan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from clip_pacl.segmentation.background import BackgroundRule, resolve_background
from clip_pacl.segmentation.overlay import NAMED_COLORS, class_colors
from clip_pacl.segmentation.predict import NO_CLASS, class_embeddings, segment

SCALE = 3  # panels are enlarged (nearest) so 64-pixel images stay readable
HEADER = 18
GAP = 4
LEGEND_COLUMNS = 5


class FigureColumn(NamedTuple):
    """One method's column: its title, the model, the segmentation method and its background rule."""

    title: str
    model: torch.nn.Module
    method: str  # "patch", "maskclip" or "pacl"
    background: str | float | None = "auto"  # a rule name (background.py), a cosine, or None: the prompt competes

    def rule(self, class_names: Sequence[str]) -> BackgroundRule:
        """The background rule this column segments with, resolved for the classes (auto: zscore or none)."""
        choice = "prompt" if self.background is None else self.background
        return resolve_background(self.model, class_names, choice, self.method)

    def heading(self, class_names: Sequence[str]) -> str:
        rule = self.rule(class_names)
        return f"{self.title} ({f'{rule.threshold:g}' if rule.name == 'threshold' else rule.name})"


def colourise(labels: np.ndarray, colors: Sequence[tuple[int, int, int]], ignore: tuple[int, int, int]) -> Image.Image:
    """A label map (H, W) as RGB: class i in colors[i], ignored / unassigned pixels in `ignore`."""
    palette = np.array([*colors, ignore], dtype=np.uint8)  # last entry: ignore / unassigned
    index = np.where((labels == NO_CLASS) | (labels >= len(colors)), len(colors), labels)
    return Image.fromarray(palette[index])


def figure_colors(names: Sequence[str]) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """(one colour per class, the colour of ignored pixels): black objects need a lighter background, white
    ones a non-white ignore colour, so a dataset of colour names gets grey background and cyan ignore."""
    colors, ignore = class_colors(names), (255, 255, 255)
    if names and names[0] == "background" and all(n in NAMED_COLORS for n in names[1:]):
        colors[0], ignore = (128, 128, 128), (0, 255, 255)
    return colors, ignore


def comparison_figure(dataset, indices: Sequence[int], columns: Sequence[FigureColumn],
                      templates: Sequence[str]) -> Image.Image:
    """The figure for images `indices` of a segmentation `dataset` (`open_segmentation_dataset`): a header row of
    column titles, one row per image (image, ground truth, each column's segmentation), a legend of the classes."""
    names = list(dataset.class_names)
    colors, ignore = figure_colors(names)
    prompts = [class_embeddings(c.model, names, templates, c.method) for c in columns]  # (C, D) each, once
    rules = [c.rule(names) for c in columns]
    rows = []
    for i in indices:
        image, mask = dataset[i]
        panels = [image.convert("RGB"), colourise(mask, colors, ignore)]
        for column, text_features, rule in zip(columns, prompts, rules):
            result = segment(column.model, image, names, templates=templates, method=column.method, background=rule,
                             text_features=text_features)
            panels.append(colourise(result.label_map, colors, ignore))
        rows.append([p.resize((p.width * SCALE, p.height * SCALE), Image.NEAREST) for p in panels])
    return _compose(["image", "ground truth", *(c.heading(names) for c in columns)], rows, names, colors)


def _compose(titles: Sequence[str], rows: Sequence[Sequence[Image.Image]], names: Sequence[str],
             colors: Sequence[tuple[int, int, int]]) -> Image.Image:
    """Panels on a white canvas under their titles, and a legend of every class below them."""
    w, h = rows[0][0].size
    legend_h = 16 * ((len(names) + LEGEND_COLUMNS - 1) // LEGEND_COLUMNS) + 8
    canvas = Image.new("RGB", (w * len(titles) + GAP * (len(titles) - 1), HEADER + len(rows) * (h + GAP) + legend_h),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((c * (w + GAP) + 2, 3), title, fill=(0, 0, 0), font=font)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            canvas.paste(panel, (c * (w + GAP), HEADER + r * (h + GAP)))
    top = HEADER + len(rows) * (h + GAP) + GAP
    col_w = canvas.width // LEGEND_COLUMNS
    for k, (name, color) in enumerate(zip(names, colors)):
        x, y = (k % LEGEND_COLUMNS) * col_w + 2, top + (k // LEGEND_COLUMNS) * 16
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=color, outline=(0, 0, 0))
        draw.text((x + 14, y), name, fill=(0, 0, 0), font=font)
    return canvas
