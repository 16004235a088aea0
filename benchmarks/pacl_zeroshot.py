"""Zero-shot classification top-1 of PACL (its patch-aligned compatibility) beside its base CLIP (cosine).

    python benchmarks/pacl_zeroshot.py --pacl DIR --data LABELS [LABELS ...] [--clip CLIP]
        [--templates simple|openai|FILE] [--out FILE]

The PACL paper reports better image-level zero-shot accuracy than CLIP: an image is scored against a class
through the patches that match the class text, not through one pooled vector. Both models run on one code
path (`evaluate_zeroshot`, which scores with `model.similarity`). LABELS are image,label tables or class-folder
trees; on the built-in data (`clip-pacl data synthetic DIR`, or a demo's data) use DIR/colors.csv and
DIR/shapes.csv. The baseline is --clip, by default the base CLIP inside the PACL checkpoint.
Results go to benchmarks/results/pacl_zeroshot.jsonl, one JSON object per (dataset, model).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import clip_pacl
from clip_pacl.data.imagefolder import read_labelled
from clip_pacl.errors import ClipPaclError
from clip_pacl.zeroshot.evaluate import evaluate_zeroshot
from clip_pacl.zeroshot.templates import resolve_templates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pacl_zeroshot.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pacl", required=True, help="PACL checkpoint dir or training run dir")
    ap.add_argument("--clip", default=None, help="baseline CLIP (default: the PACL checkpoint's base CLIP)")
    ap.add_argument("--data", required=True, nargs="+", help="image,label tables or class-folder trees")
    ap.add_argument("--templates", default="simple", help="simple, openai or a file of templates")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSONL file to append results to")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    templates = resolve_templates(args.templates)
    pacl = clip_pacl.load(args.pacl, random_weights=True).eval()
    if not hasattr(pacl, "patch_similarity"):
        raise SystemExit(f"error: {args.pacl} is not a PACL checkpoint")
    clip = clip_pacl.load(args.clip, random_weights=True).eval() if args.clip else pacl.clip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    for data in args.data:
        rows = read_labelled(data)
        top1 = {}
        for name, model, source in (("clip", clip, args.clip or f"{args.pacl} (base CLIP)"), ("pacl", pacl, args.pacl)):
            r = evaluate_zeroshot(model, rows, templates, progress=False)
            top1[name] = r["top1"]
            row = {"run": run_id, "data": data, "method": name, "model": source, "top1": round(r["top1"], 4),
                   "top5": round(r["top5"], 4), "mean_per_class_recall": round(r["mean_per_class_recall"], 4),
                   "num_images": r["num_images"], "num_classes": r["num_classes"], "num_templates": len(templates),
                   "torch": torch.__version__, "machine": platform.machine()}
            append_jsonl(args.out, [row])
        print(f"{data}: top-1 CLIP {top1['clip']:.3f}, PACL {top1['pacl']:.3f} "
              f"({r['num_images']} images, {r['num_classes']} classes)", flush=True)


if __name__ == "__main__":
    try:
        main()
    except ClipPaclError as e:  # a missing or unreadable model or dataset: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
