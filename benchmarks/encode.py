"""Image and text encoding throughput, clip-pacl vs open_clip, same weights, same inputs, one process.

For each model an open_clip model is created with random weights (BatchNorm statistics randomised so they matter),
its state dict is converted to ours, and both encode the same batch: a random image batch at the model's resolution,
or COCO-like captions (8-20 words, fixed seed) tokenized with context 77. Calls alternate between the two libraries
(which one goes first alternates too), after warm-up; the median time per call gives images (or texts) per second.
The outputs of both are compared in the same run. One JSON object per measurement is appended to --out.

    python benchmarks/encode.py --models ViT-B-32,RN50 --towers image,text --batch 16 --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from clip_pacl.checkpoint.convert_open_clip import from_open_clip
from clip_pacl.config import CLIPConfig
from clip_pacl.models import CLIP
from clip_pacl.tokenizer import tokenize

SUBJECTS = ["a man", "a woman", "two dogs", "a cat", "a child", "a group of people", "a red bus", "a small boat",
            "an old train", "a brown horse", "a plate of food", "a skateboarder", "a giraffe", "three birds"]
VERBS = ["sitting on", "standing next to", "riding", "walking along", "looking at", "playing with", "parked near",
         "flying over", "lying on", "eating"]
OBJECTS = ["a wooden bench", "the beach", "a busy city street", "a snowy mountain", "a kitchen table", "the river",
           "a green field", "a tall building", "a wave", "a pizza", "the park", "a train station"]
EXTRAS = ["at sunset", "on a sunny day", "in the rain", "with trees in the background", "while people watch",
          "in front of a large crowd", "under a blue sky", "next to a white fence", "at night"]


def coco_like_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of roughly 8-20 words, like COCO's."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        for extra in rng.sample(EXTRAS, rng.randint(1, 2)):
            words += f" {extra}"
        captions.append(words[0].upper() + words[1:] + ".")
    return captions


def build_pair(name: str) -> tuple[torch.nn.Module, CLIP]:
    """(open_clip model, our model) with identical weights, both in eval mode."""
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    theirs = open_clip.create_model(name).eval()
    for module in theirs.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_(1, 0.1)
    ours = CLIP(CLIPConfig.from_name(name))
    ours.load_state_dict(from_open_clip(theirs.state_dict()))
    return theirs, ours.eval()


def median_seconds(fn_ours, fn_theirs, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall-clock and process CPU seconds per call. CPU time is reported too because the machine may be
    shared: other processes stretch wall time but barely change the CPU time our own threads need."""
    for _ in range(warmup):
        fn_ours()
        fn_theirs()
    wall = {"ours": [], "theirs": []}
    cpu = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = [("ours", fn_ours), ("theirs", fn_theirs)]
        for key, fn in order if r % 2 == 0 else order[::-1]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - start_wall)
            cpu[key].append(time.process_time() - start_cpu)
    return {f"{kind}_{key}": statistics.median(values[key]) for kind, values in (("wall", wall), ("cpu", cpu))
            for key in ("ours", "theirs")}


def measure(name: str, tower: str, batch: int, repeats: int, warmup: int, threads: int) -> dict:
    theirs, ours = build_pair(name)
    if tower == "image":
        size = ours.image_size
        inputs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)
        run_ours, run_theirs = (lambda: ours.encode_image(inputs)), (lambda: theirs.encode_image(inputs))
    else:
        inputs = tokenize(coco_like_captions(batch), context_length=ours.context_length)  # (B, 77)
        run_ours, run_theirs = (lambda: ours.encode_text(inputs)), (lambda: theirs.encode_text(inputs))
    with torch.inference_mode():
        max_abs_diff = float((run_ours() - run_theirs()).abs().max())
        seconds = median_seconds(run_ours, run_theirs, repeats, warmup)
    record = {
        "model": name,
        "tower": tower,
        "batch": batch,
        "threads": threads,
        "ours_per_s": round(batch / seconds["wall_ours"], 2),
        "open_clip_per_s": round(batch / seconds["wall_theirs"], 2),
        "ratio": round(seconds["wall_theirs"] / seconds["wall_ours"], 3),
        "cpu_ratio": round(seconds["cpu_theirs"] / seconds["cpu_ours"], 3),
        "max_abs_diff": max_abs_diff,
        "repeats": repeats,
        "torch": torch.__version__,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if tower == "text":
        record["max_tokens"] = int(inputs.argmax(-1).max()) + 1
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,RN50", help="comma-separated open_clip model names")
    parser.add_argument("--towers", default="image,text", help="comma-separated: image, text")
    parser.add_argument("--batch", type=int, default=16, help="images (or texts) per call")
    parser.add_argument("--text-batch", type=int, default=None, help="texts per call (default: --batch)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both libraries")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per library (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per library first")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encode.jsonl",
                        help="JSONL file the measurements are appended to")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    if unknown := set(towers) - {"image", "text"}:
        parser.error(f"unknown tower(s) {sorted(unknown)} (image, text)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for tower in towers:
            batch = args.text_batch or args.batch if tower == "text" else args.batch
            record = measure(name, tower, batch, args.repeats, args.warmup, args.threads)
            print(json.dumps(record), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
