"""Does the training data loader keep up with the training step? Images per second of each, and of both together.

On a synthetic set written to a temporary folder, for each --workers count:

- `loader_images_per_s`: the loader alone (decode + train transform + tokenize + collate), second epoch (persistent
  workers, what a long run sees; the first epoch, which starts the workers, is recorded too);
- `step_images_per_s`: what clip-pacl's training step consumes (`--model` at the loader's image size and batch size,
  forward + loss + backward + AdamW on one in-memory batch, as benchmarks/train_step.py times it); measured once;
- `loop_images_per_s`: the loader feeding that step, batch after batch (the rate a run gets);
- `loader_keeps_up`: loader alone >= step alone.

With --device cuda the step runs on the GPU (the loader's host batches are copied to it, as in the loop; the step
timings wait for the device), optionally under --amp bf16. The machine's 1-minute load average is recorded: worker
scaling means nothing on a machine that is already busy. One JSON line per worker count is appended to
benchmarks/results/dataload.jsonl and a table is printed.

    python benchmarks/dataload.py --n 512 --model tiny --workers 0 1 2 --threads 2
    python benchmarks/dataload.py --device cuda --amp bf16 --n 2048 --model ViT-B-32 --batch-size 256 --workers 4 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from clip_pacl.config import CLIPConfig
from clip_pacl.data import build_caption_dataset, build_loader
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.tokenizer import get_tokenizer
from clip_pacl.transforms import image_transform

sys.path.insert(0, str(Path(__file__).parent))
from encode import AMP_DTYPES  # noqa: E402
from machine import device_or_exit, machine_info, synchronize  # noqa: E402
from train_step import build_library  # noqa: E402


def _epoch(loader, step=None, device: torch.device = torch.device("cpu")) -> tuple[int, float]:
    """(images, seconds) of one pass over the loader, calling `step((images, texts))` on each batch when given; the
    clock stops when the device has finished the last step."""
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch)
        if step is not None:
            step(batch.inputs)
    synchronize(device)
    return n, time.perf_counter() - start


def step_rate(step, batch: tuple[torch.Tensor, torch.Tensor], repeats: int,
              device: torch.device = torch.device("cpu")) -> float:
    """Images per second the training step consumes (median of `repeats` after one warm-up step), host batch in."""
    step(batch)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return batch[0].shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="images in the synthetic set")
    parser.add_argument("--source-size", type=int, default=128, help="side of the synthetic PNGs")
    parser.add_argument("--model", default="tiny", help="preset whose training step consumes the batches")
    parser.add_argument("--image-size", type=int, default=None, help="model input side (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the training step runs")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none",
                        help="bf16: the step's forward and loss under torch.autocast(bfloat16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps for the step rate")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dataload.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = device_or_exit(args.device)
    image_size = args.image_size or CLIPConfig.from_name(args.model).vision.image_size
    _, step = build_library("clip_pacl", args.model, device, amp=args.amp)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(tmp, args.n, seed=0, image_size=args.source_size)
        dataset, _ = build_caption_dataset(Path(tmp) / "captions.csv", transform=image_transform(image_size,
                                           train=True), tokenizer=get_tokenizer())
        first = next(iter(build_loader(dataset, batch_size=args.batch_size, shuffle=False, workers=0, seed=0,
                                       drop_last=True)))
        step_images_per_s = step_rate(step, first.inputs, args.repeats, device)
        for workers in args.workers:
            loader = build_loader(dataset, batch_size=args.batch_size, shuffle=True, workers=workers, seed=0,
                                  drop_last=True)
            n_first, t_first = _epoch(loader)
            n_second, t_second = _epoch(loader)
            n_loop, t_loop = _epoch(loader, step, device)
            loader_rate = n_second / t_second
            records.append({
                "benchmark": "dataload", "model": args.model, "workers": workers, "images": n_second,
                "batch_size": args.batch_size, "source_size": args.source_size, "image_size": image_size,
                "amp": args.amp,
                "first_epoch_images_per_s": round(n_first / t_first, 1),
                "loader_images_per_s": round(loader_rate, 1),
                "step_images_per_s": round(step_images_per_s, 1),
                "loop_images_per_s": round(n_loop / t_loop, 1),
                "loader_keeps_up": loader_rate >= step_images_per_s,
                **machine_info(device), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            print(json.dumps(records[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"{'workers':>7} {'loader img/s':>12} {'step img/s':>10} {'loop img/s':>10} {'keeps up':>8}")
    for r in records:
        print(f"{r['workers']:>7} {r['loader_images_per_s']:>12} {r['step_images_per_s']:>10} "
              f"{r['loop_images_per_s']:>10} {str(r['loader_keeps_up']):>8}")


if __name__ == "__main__":
    main()
