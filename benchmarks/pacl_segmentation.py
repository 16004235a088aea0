"""Segmentation mIoU of PACL against the training-free baselines, over a sweep of background thresholds.

    python benchmarks/pacl_segmentation.py --pacl DIR --data SEGDIR [SEGDIR ...] [--clip CLIP]
        [--thresholds none 0.2 0.3 0.4 0.5] [--limit N] [--out FILE]

For every dataset and every background setting it evaluates, on one code path (`evaluate_segmentation_thresholds`,
which encodes each image once and labels it at every threshold):
  patch     the base CLIP's raw patch tokens against its text embeddings,
  maskclip  the base CLIP's MaskCLIP value-path tokens,
  pacl      PACL's patch embeddings against its text embeddings.
The baselines run on --clip, by default the base CLIP inside the PACL checkpoint; pass the original CLIP when
PACL fine-tuned its last blocks (--pacl-unfreeze-blocks), or the baselines would profit from PACL's training.
"none" means no threshold: the dataset's "background" class competes through its prompt like any other class.
Each method is reported at every setting (no setting is picked per method behind the reader's back); the
summary line per dataset gives each method's best setting and the ratio of PACL's best to the better baseline's best.
Prompt templates are the dataset's templates.txt when it has one (see `evaluate_segmentation`).
Results go to benchmarks/results/pacl_segmentation.jsonl, one JSON object per (dataset, method, setting).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import clip_pacl
from clip_pacl.errors import ClipPaclError
from clip_pacl.segmentation.evaluate import evaluate_segmentation_thresholds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pacl_segmentation.jsonl"


def _threshold(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pacl", required=True, help="PACL checkpoint dir (its base CLIP runs the baselines)")
    ap.add_argument("--clip", default=None, help="CLIP for the baselines (default: the PACL checkpoint's base CLIP)")
    ap.add_argument("--data", required=True, nargs="+", help="segmentation dataset dirs")
    ap.add_argument("--thresholds", nargs="+", default=["none", "0.2", "0.3", "0.4", "0.5"],
                    help="background thresholds to sweep; 'none' = background by its prompt")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of each set")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSONL file to append results to")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pacl = clip_pacl.load(args.pacl, random_weights=True).eval()
    if not hasattr(pacl, "patch_similarity"):
        raise SystemExit(f"error: {args.pacl} is not a PACL checkpoint")
    clip = clip_pacl.load(args.clip, random_weights=True).eval() if args.clip else pacl.clip
    thresholds = [_threshold(t) for t in args.thresholds]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    for data in args.data:
        best: dict[str, tuple[float, float | None]] = {}
        for method in ("patch", "maskclip", "pacl"):
            model = pacl if method == "pacl" else clip
            results = evaluate_segmentation_thresholds(model, data, thresholds, method=method, limit=args.limit)
            for thr, r in zip(thresholds, results):
                row = {"run": run_id, "model": args.pacl if method == "pacl" else (args.clip or args.pacl),
                       "data": data, "method": method, "background_threshold": thr,
                       "miou": round(r["miou"], 4), "pixel_accuracy": round(r["pixel_accuracy"], 4),
                       "per_class_iou": {k: None if v is None else round(v, 4)
                                         for k, v in r["per_class_iou"].items()},
                       "num_images": r["num_images"], "templates": r["templates"], "torch": torch.__version__,
                       "machine": platform.machine()}
                append_jsonl(args.out, [row])
                print(f"{Path(data).name:22s} {method:9s} threshold {thr!s:5s} mIoU {r['miou']:.3f}  "
                      f"pixel acc {r['pixel_accuracy']:.3f}", flush=True)
                if method not in best or r["miou"] > best[method][0]:
                    best[method] = (r["miou"], thr)
        baseline = max(best["patch"][0], best["maskclip"][0])
        summary = ", ".join(f"{m} {v:.3f} (threshold {t})" for m, (v, t) in best.items())
        ratio = best["pacl"][0] / baseline if baseline > 0 else float("inf")
        print(f"{data}: best {summary}; PACL / better baseline = {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    try:
        main()
    except ClipPaclError as e:  # a missing or unreadable model or dataset: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
