"""Segmentation with a background class, without tuning on test labels: the background rules side by side.

    python benchmarks/pacl_background.py --pacl DIR --val VALDIR [VALDIR ...] --test TESTDIR [TESTDIR ...]
        [--grid 0.05 0.1 ... 0.6] [--limit N] [--out FILE]

Each --val dir is paired with the --test dir at the same position (two splits of one kind of data, with
masks). For the raw-patch and MaskCLIP baselines (on the PACL checkpoint's base CLIP) and PACL, it scores
the TEST split with:
  prompt      no threshold: the "background" class competes through its prompt,
  calibrated  PACL only: the threshold calibrated on the training captions (the checkpoint's config),
  zscore      per image: foreground above the mean + 1 std of the image's best class scores,
  otsu        the per-image Otsu rule,
  auto        what `segment` / `eval segmentation` do by default (one of the above; named in the output),
  val-best    the fixed threshold of --grid that scores best on the VAL split (masks used there only),
and reports auto / val-best (the goal: at least 0.9). Rows go to benchmarks/results/pacl_background.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import clip_pacl
from clip_pacl.errors import ClipPaclError
from clip_pacl.segmentation.evaluate import evaluate_segmentation_thresholds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pacl_background.jsonl"
GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7]


def compare(model, method: str, val: str, test: str, grid: list[float], limit: int | None) -> list[dict]:
    """One row per rule on the test split; the val split only picks the val-best threshold."""
    sweep = evaluate_segmentation_thresholds(model, val, grid, method=method, limit=limit)
    best = max(sweep, key=lambda r: r["miou"])
    rules = ["prompt", "zscore", "otsu", "auto", best["background_threshold"]]
    if method == "pacl" and model.config.background_threshold is not None:
        rules.insert(1, "calibrated")
    names = [r if isinstance(r, str) else "val-best" for r in rules]
    results = evaluate_segmentation_thresholds(model, test, rules, method=method, limit=limit)
    return [{"setting": name, "rule": r["background"]["rule"], "background_threshold": r["background_threshold"],
             "miou": round(r["miou"], 4), "pixel_accuracy": round(r["pixel_accuracy"], 4),
             "val_miou": round(best["miou"], 4) if name == "val-best" else None, "num_images": r["num_images"]}
            for name, r in zip(names, results)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pacl", required=True, help="PACL checkpoint dir (its base CLIP runs the baselines)")
    ap.add_argument("--val", required=True, nargs="+", help="segmentation dirs that choose the val-best threshold")
    ap.add_argument("--test", required=True, nargs="+", help="segmentation dirs scored, paired with --val")
    ap.add_argument("--grid", nargs="+", type=float, default=GRID, help="thresholds tried on the val split")
    ap.add_argument("--methods", nargs="+", default=["patch", "maskclip", "pacl"], help="methods to compare")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSONL file to append results to")
    args = ap.parse_args()
    if len(args.val) != len(args.test):
        raise SystemExit(f"error: {len(args.val)} --val dirs but {len(args.test)} --test dirs (pair them)")
    if args.threads:
        torch.set_num_threads(args.threads)
    pacl = clip_pacl.load(args.pacl, random_weights=True).eval()
    if not hasattr(pacl, "patch_similarity"):
        raise SystemExit(f"error: {args.pacl} is not a PACL checkpoint")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    table = []
    for val, test in zip(args.val, args.test):
        for method in args.methods:
            rows = compare(pacl if method == "pacl" else pacl.clip, method, val, test, args.grid, args.limit)
            append_jsonl(args.out, [{"run": run_id, "model": args.pacl, "val": val, "test": test, "method": method,
                                     **row} for row in rows])
            by = {r["setting"]: r for r in rows}
            ratio = by["auto"]["miou"] / by["val-best"]["miou"] if by["val-best"]["miou"] > 0 else float("nan")
            table.append((test, method, by, ratio))
            print(f"{test}  {method}: " + ", ".join(
                f"{name} {r['miou']:.3f}" + (f" (t={r['background_threshold']:.3g})"
                                             if r["background_threshold"] is not None else "")
                for name, r in by.items()) + f"; auto = {by['auto']['rule']}, auto / val-best = {ratio:.2f}",
                flush=True)
    print("\n| test set | method | no threshold (prompt) | calibrated | per-image Otsu | per-image zscore "
          "| auto (rule) | val-best (t) | auto / val-best |\n|---|---|---|---|---|---|---|---|---|")
    for test, method, by, ratio in table:
        cal = f"{by['calibrated']['miou']:.3f}" if "calibrated" in by else "n/a"
        print(f"| {test} | {method} | {by['prompt']['miou']:.3f} | {cal} | {by['otsu']['miou']:.3f} | "
              f"{by['zscore']['miou']:.3f} | {by['auto']['miou']:.3f} ({by['auto']['rule']}) | "
              f"{by['val-best']['miou']:.3f} ({by['val-best']['background_threshold']:g}) | {ratio:.2f} |")


if __name__ == "__main__":
    try:
        main()
    except ClipPaclError as e:  # a missing or unreadable model or dataset: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
