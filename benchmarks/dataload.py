"""Images per second of the training data loader alone (decode + train transform + tokenize + collate).

Runs on a synthetic set written to a temporary folder, for each worker count, and appends one JSON
line per setting to benchmarks/results/dataload.jsonl. The first epoch includes starting the workers;
the second reuses them (persistent workers), which is what a long training run sees. The machine's
1-minute load average is recorded too: worker scaling means nothing on a machine that is already busy.

    python benchmarks/dataload.py --n 1024 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from clip_pacl.data import build_caption_dataset, build_loader
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.tokenizer import get_tokenizer
from clip_pacl.transforms import image_transform


def _epoch(loader) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(batch["images"].shape[0] for batch in loader)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="images in the synthetic set")
    parser.add_argument("--source-size", type=int, default=128, help="side of the synthetic PNGs")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (the transform's output)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dataload.jsonl"))
    args = parser.parse_args()

    torch.set_num_threads(1)  # workers do the work; keep the main process from competing with them
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(tmp, args.n, seed=0, image_size=args.source_size)
        dataset, _ = build_caption_dataset(Path(tmp) / "captions.csv", transform=image_transform(args.image_size,
                                           train=True), tokenizer=get_tokenizer())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        for workers in args.workers:
            loader = build_loader(dataset, batch_size=args.batch_size, shuffle=True, workers=workers, seed=0,
                                  drop_last=False)
            n_first, t_first = _epoch(loader)
            n_second, t_second = _epoch(loader)
            record = {
                "benchmark": "dataload", "workers": workers, "images": n_second, "batch_size": args.batch_size,
                "source_size": args.source_size, "image_size": args.image_size,
                "first_epoch_images_per_s": round(n_first / t_first, 1),
                "images_per_s": round(n_second / t_second, 1),
                "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                "torch": torch.__version__, "python": platform.python_version(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            print(json.dumps(record), file=sys.stdout, flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
