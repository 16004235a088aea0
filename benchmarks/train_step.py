"""Training-step throughput: clip-pacl's step vs open_clip's on the same model, and clip-pacl's whole loop.

`step`: the `tiny` CLIP, identical weights in both libraries, one in-memory batch (random 64 px images,
COCO-like captions); one step = forward, CLIP loss, backward, gradient clipping, AdamW. clip-pacl's side is
`clip_pacl.train.accumulate_gradients` + `clip_grad_norm_` + its AdamW; open_clip's is its `CLIP` model with
`ClipLoss` and AdamW. Steps alternate between the libraries after warm-up; the median time gives steps/s.

`loop`: `clip_pacl.train.train` on the built-in synthetic set (decoding, augmentation, the loop's logging and
host syncs included), steps/s from the loop's own `samples_per_s` windows after the first (warm-up) one.

    python benchmarks/train_step.py --device cpu --batch-size 128 --steps 20 --threads 2
    python benchmarks/train_step.py --device cuda --batch-size 128 --steps 100

Appends one JSON object per measurement to benchmarks/results/train_step.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import clip_pacl
from clip_pacl.checkpoint.convert_open_clip import to_open_clip
from clip_pacl.config import CLIPConfig
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.losses import get_objective
from clip_pacl.tokenizer import tokenize
from clip_pacl.train import TrainConfig, accumulate_gradients, train
from clip_pacl.train.optim import build_optimizer
from clip_pacl.train.setup import FeatureModel

sys.path.insert(0, str(Path(__file__).parent))
from encode import coco_like_captions  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_step.jsonl"
PRESET = "tiny"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, clip: float):
    """clip-pacl: the loop's gradient computation, clipping and AdamW."""
    accumulate_gradients(FeatureModel(model), get_objective("clip"), [batch])
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def open_clip_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, clip: float, loss_fn) -> None:
    """open_clip: open_clip_train's fp32 step (accum_freq 1)."""
    out = model(*batch)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, norm_type=2.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_step(args, device: torch.device) -> list[dict]:
    import open_clip

    torch.manual_seed(0)
    ours = clip_pacl.load(PRESET).to(device)
    oc_cfg = CLIPConfig.from_name(PRESET).to_open_clip_dict()
    theirs = open_clip.model.CLIP(oc_cfg["embed_dim"], oc_cfg["vision_cfg"], oc_cfg["text_cfg"],
                                  quick_gelu=oc_cfg["quick_gelu"], output_dict=True)
    theirs.load_state_dict(to_open_clip(ours.state_dict()))
    theirs.to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    batch = (images, tokenize(coco_like_captions(args.batch_size)).to(device))
    opt_ours = build_optimizer(ours, 1e-4, 0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                                   fused=device.type == "cuda" or None)
    runners = {"clip_pacl": lambda: ours_step(ours, opt_ours, batch, 1.0),
               "open_clip": lambda: open_clip_step(theirs, opt_theirs, batch, 1.0, open_clip.loss.ClipLoss())}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            _sync(device)
            start = time.perf_counter()
            runners[name]()
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return [{"mode": "step", "library": name, "steps_per_s": round(1 / statistics.median(t), 3),
             "median_ms": round(1000 * statistics.median(t), 2)} for name, t in times.items()]


def bench_loop(args, device: torch.device) -> list[dict]:
    data = args.workdir / f"synthetic-{args.n_images}-{args.image_size}"
    if not (data / "captions.csv").is_file():
        generate_synthetic(data, args.n_images, seed=0, image_size=args.image_size)
    run_dir = args.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(data=str(data / "captions.csv"), model=PRESET, out=str(run_dir), steps=args.steps,
                         batch_size=args.batch_size, image_size=args.image_size, device=device.type,
                         log_every=args.log_every, workers=args.workers, progress=False)
    train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] / args.batch_size for r in records if "samples_per_s" in r][1:]
    shutil.rmtree(run_dir, ignore_errors=True)
    return [{"mode": "loop", "library": "clip_pacl", "steps_per_s": round(statistics.median(rates), 3),
             "windows": len(rates), "log_every": args.log_every, "workers": args.workers}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", default="step,loop", help="comma-separated: step, loop")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps (loop: the run's length)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (step mode)")
    p.add_argument("--log-every", type=int, default=5, help="loop mode: the run's --log-every (a timing window)")
    p.add_argument("--n-images", type=int, default=512, help="loop mode: synthetic training images")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="", help="free text stored with the results (e.g. the commit)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/clip_pacl_train_step"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = args.modes.split(",")
    common = {"preset": PRESET, "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps,
              "device": args.device, "threads": args.threads, "label": args.label, "torch": torch.__version__,
              "machine": platform.machine(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    records = (bench_step(args, device) if "step" in modes else []) + (bench_loop(args, device) if "loop" in modes
                                                                       else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in records:
            f.write(json.dumps({**r, **common}) + "\n")
            print(json.dumps({**r, **common}))


if __name__ == "__main__":
    main()
