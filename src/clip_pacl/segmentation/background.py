"""Which pixels are background: rules that need no labelled masks.

An open-vocabulary segmenter scores each pixel against the class prompts; a prompt for "background" is a
poor competitor (nothing in a caption describes it), so the usual fix is a cosine threshold under which a
pixel is background. A threshold tuned on labelled masks is not available to a user, and each model's scores
live on their own scale (PACL's best is near 0.1-0.2, the raw CLIP baselines' near 0.5). The rules here:

  "zscore"      per image: a pixel is foreground when its best class score is more than one standard deviation
                above the image's mean best score. Works for any model (PACL and the raw-patch and MaskCLIP
                baselines); assumes objects cover a minority of the image.
  "otsu"        per image: the Otsu split of the image's best-class-score map.
  "calibrated"  PACL only: a threshold measured on the model's own training captions (`calibrate.py`): each
                training image's patches scored against its own caption split (Otsu) into the described objects
                and the rest; `clip-pacl calibrate` saves it in the PACL config (`background_threshold`).
                Unlike the per-image rules it can call a whole image background.
  "prompt"      no threshold: the "background" class competes through its prompt like any other.
  "threshold"   a fixed cosine the user gave.

"auto" (the default) is "zscore" for every method when the classes include "background"; with no
"background" class every pixel gets its best class ("none"). The evidence (benchmarks/pacl_background.py,
README "Background without labels"): on held-out images, zscore reaches 0.9x or more of the best fixed
threshold chosen on a labelled validation split, for PACL on both generated sets. Otsu falls short on the
built-in set (0.87x), and the caption calibration lands far too low: PACL scores patches against a whole
caption on another scale than against a class prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clip_pacl.errors import ConfigError
from clip_pacl.segmentation.rules import AUTO_RULE, RULES

BACKGROUND = "background"
ZSCORE_K = 1.0  # foreground: more than this many standard deviations above the image's mean best score
HISTOGRAM_BINS = 256


@dataclass(frozen=True)
class BackgroundRule:
    """A resolved background decision; `name` is one of zscore, otsu, calibrated, prompt, threshold, none."""

    name: str
    threshold: float | None = None  # the cosine for "calibrated" and "threshold"
    note: str = ""  # why this rule was chosen, when not asked for by name (shown to the user)

    def describe(self) -> str:
        if self.name == "calibrated":
            what = f"calibrated threshold {self.threshold:.4f} (from the training captions)"
        elif self.name == "threshold":
            what = f"fixed threshold {self.threshold:g}"
        else:
            what = {"zscore": f"per-image threshold: mean + {ZSCORE_K:g} std of the image's best class scores",
                    "otsu": "per-image Otsu threshold", "prompt": "no threshold: the background prompt competes",
                    "none": "no background class: every pixel gets its best class"}[self.name]
        return f"{what}; {self.note}" if self.note else what

    def to_dict(self) -> dict:
        return {"rule": self.name, "threshold": self.threshold, "description": self.describe()}

    def image_threshold(self, best: torch.Tensor) -> float | None:
        """The cosine under which pixels of this image are background; `best` is its best-foreground map (H, W)."""
        if self.name == "zscore":
            return float(best.mean() + ZSCORE_K * best.float().std())
        if self.name == "otsu":
            return otsu_threshold(best)
        return self.threshold  # None for "prompt" / "none"


def otsu_threshold(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> float:
    """The split of `values` that maximises the between-class variance (Otsu, 1979), on a `bins` histogram."""
    values = values.detach().float().flatten()
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return lo
    hist = torch.histc(values, bins=bins, min=lo, max=hi).double()
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)  # pixels at or below each bin
    m0 = (hist * centres).cumsum(0)
    w1 = w0[-1] - w0
    m1 = m0[-1] - m0
    between = w0 * w1 * (m0 / w0.clamp_min(1e-12) - m1 / w1.clamp_min(1e-12)) ** 2  # (bins,)
    between = between[:-1]  # the split falls after bin k
    best = (between >= between.max() * (1 - 1e-9)).nonzero().flatten()
    k = (int(best[0]) + int(best[-1])) / 2  # empty bins between two clusters tie: split in the middle of the gap
    return lo + (k + 1) * (hi - lo) / bins


def background_index(class_names: Sequence[str]) -> int | None:
    names = [n.strip().lower() for n in class_names]
    return names.index(BACKGROUND) if BACKGROUND in names else None


def resolve_background(
    model: torch.nn.Module,
    class_names: Sequence[str],
    background: str | float | None = "auto",
    method: str = "pacl",
) -> BackgroundRule:
    """Turn what the user asked for (`--background`: a rule name, a cosine, or None = "auto") into a rule.

    A named rule or a cosine applies even without a "background" class (the pixels it rejects are then left
    unassigned); "auto" only thresholds when the classes include "background".
    """
    if background is not None and not isinstance(background, str):
        return BackgroundRule("threshold", float(background))
    name = (background or "auto").strip().lower()
    if name not in RULES:
        try:
            return BackgroundRule("threshold", float(name))
        except ValueError:
            raise ConfigError(f"unknown background rule '{background}' (choose from {', '.join(RULES)}, "
                              "or give a threshold)") from None
    calibrated = getattr(getattr(model, "config", None), "background_threshold", None) if method == "pacl" else None
    if name == "calibrated":
        if calibrated is None:
            raise ConfigError("this model has no background calibration (only PACL checkpoints do, with the "
                              "'pacl' method); add one with `clip-pacl calibrate --model DIR --data CAPTIONS`")
        return BackgroundRule("calibrated", float(calibrated))
    if name in ("zscore", "otsu", "prompt"):
        return BackgroundRule(name)
    if background_index(class_names) is None:
        return BackgroundRule("none")
    return BackgroundRule(AUTO_RULE, note="auto")
