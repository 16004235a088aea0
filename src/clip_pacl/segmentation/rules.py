"""The background rules' names and what each means: plain data, imported by the command-line parsers without
torch (`segmentation/background.py` applies them)."""

RULES = ("auto", "zscore", "otsu", "calibrated", "prompt")
AUTO_RULE = "zscore"  # what "auto" means when the classes include "background" (background.py)
# one line per rule, for `--background`'s help (tests check that it lists every rule and what auto does)
RULE_HELP = {
    "auto": f"with a 'background' class, {AUTO_RULE} (for every method); without one, every pixel gets its best class",
    "zscore": "per image, a pixel is background unless its best class score is more than one standard deviation "
              "above the image's mean best score",
    "otsu": "a per-image Otsu split of the best class scores",
    "calibrated": "the threshold a PACL checkpoint calibrated on its training captions (clip-pacl calibrate)",
    "prompt": "no threshold, the background prompt competes",
}

__all__ = ["AUTO_RULE", "RULE_HELP", "RULES"]
