"""Which pixels are background: rules that need no labelled masks.

An open-vocabulary segmenter scores each pixel against the class prompts; a prompt for "background" is a
poor competitor (nothing in a caption describes it), so the usual fix is a cosine threshold under which a
pixel is background. A threshold tuned on labelled masks is not available to a user, and each model's scores
live on their own scale (PACL's best is near 0.2, the raw CLIP baselines' near 0.5). The rules here:

  "calibrated"  a threshold measured on the model's own training captions (`calibrate.py`): each training
                image's patches scored against its own caption split into the described object (high) and the
                rest (low); the Otsu split of those scores is saved in the PACL config (`background_threshold`).
  "otsu"        per image: the Otsu split of the image's best-foreground-score map. Works for any model
                (the raw-patch and MaskCLIP baselines too); assumes the image holds some foreground.
  "prompt"      no threshold: the "background" class competes through its prompt like any other.
  "threshold"   a fixed cosine the user gave.

"auto" (the default) picks, when the classes include "background": "calibrated" for a PACL checkpoint that
carries a calibration, else "otsu"; with no "background" class every pixel gets its best class ("none").
benchmarks/pacl_background.py holds the evidence for that choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clip_pacl.errors import ConfigError

BACKGROUND = "background"
RULES = ("auto", "calibrated", "otsu", "prompt")
HISTOGRAM_BINS = 256


@dataclass(frozen=True)
class BackgroundRule:
    """A resolved background decision; `name` is one of calibrated, otsu, prompt, threshold, none."""

    name: str
    threshold: float | None = None  # the cosine for "calibrated" and "threshold"
    note: str = ""  # why this rule was chosen, when not asked for by name (shown to the user)

    def describe(self) -> str:
        if self.name == "calibrated":
            what = f"calibrated threshold {self.threshold:.4f} (from the training captions)"
        elif self.name == "threshold":
            what = f"fixed threshold {self.threshold:g}"
        else:
            what = {"otsu": "per-image Otsu threshold", "prompt": "no threshold: the background prompt competes",
                    "none": "no background class: every pixel gets its best class"}[self.name]
        return f"{what}; {self.note}" if self.note else what

    def to_dict(self) -> dict:
        return {"rule": self.name, "threshold": self.threshold, "description": self.describe()}

    def image_threshold(self, best: torch.Tensor) -> float | None:
        """The cosine under which pixels of this image are background; `best` is its best-foreground map (H, W)."""
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
    if name in ("otsu", "prompt"):
        return BackgroundRule(name)
    if background_index(class_names) is None:
        return BackgroundRule("none")
    if calibrated is not None:
        return BackgroundRule("calibrated", float(calibrated), "auto")
    if method == "pacl":
        return BackgroundRule("otsu", note="auto: this PACL checkpoint has no background calibration "
                                           "(add one with `clip-pacl calibrate`)")
    return BackgroundRule("otsu", note=f"auto: the default for the '{method}' method")
