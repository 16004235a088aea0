"""Training-step throughput: clip-pacl's step vs open_clip's on the same model, and clip-pacl's whole loop.

`step`: for each --configs entry (preset:batch:image size; by default `tiny` at 64 px batch 128 and ViT-B-32 at
224 px batch 16), identical weights in both libraries, one in-memory batch (random images, COCO-like captions
tokenized to the 77-token context); one step = forward, CLIP loss, backward, gradient clipping, AdamW. clip-pacl's
side is what its loop does with a loader batch: `trim_text_padding` (the token ids cut after the longest caption, on
the host), `clip_pacl.train.accumulate_gradients`, `clip_grad_norm_` and its fused AdamW; open_clip's is its `CLIP`
model with `ClipLoss` and AdamW (PyTorch's default implementation), as open_clip_train runs them. Steps alternate
between the libraries after warm-up; the median time gives steps/s (wall clock, and process CPU time, which a shared
machine stretches less).

`loop`: `clip_pacl.train.train` on the built-in synthetic set (decoding, augmentation, the loop's logging and
host syncs included), steps/s from the loop's own `samples_per_s` windows after the first (warm-up) one.

`rss`: peak resident memory (ru_maxrss) of training the first --configs entry for --steps steps, each library in a
child process of its own that builds only its own model.

    python benchmarks/train_step.py --modes step --configs tiny:128:64,ViT-B-32:16:224 --steps 5 --threads 2
    python benchmarks/train_step.py --modes rss --configs tiny:128:64 --steps 5 --threads 2
    python benchmarks/train_step.py --device cuda --batch-size 128 --steps 100

Appends one JSON object per measurement to benchmarks/results/train_step.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import json
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
from clip_pacl.train.setup import FeatureModel, trim_text_padding

sys.path.insert(0, str(Path(__file__).parent))
from encode import coco_like_captions  # noqa: E402
from machine import current_rss_mb, machine_info, peak_rss_mb, run_child  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_step.jsonl"
PRESET = "tiny"  # loop mode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, clip: float):
    """clip-pacl: the loop's host-side text trim, gradient computation, clipping and AdamW."""
    images, texts = batch
    accumulate_gradients(FeatureModel(model), get_objective("clip"), [(images, trim_text_padding(model, texts))])
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


def parse_configs(text: str) -> list[tuple[str, int, int]]:
    """"tiny:128:64,ViT-B-32:16:224" -> [(preset, batch size, image size), ...]."""
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        preset, batch, size = item.split(":")
        configs.append((preset, int(batch), int(size)))
    return configs


def build_library(library: str, preset: str, device: torch.device, same_weights: bool = True):
    """(model, step function taking a batch) for one library. With `same_weights` open_clip's model gets clip-pacl's
    seeded weights (converted); without (memory measurements), each library builds only its own model."""
    torch.manual_seed(0)
    if library == "clip_pacl":
        ours = clip_pacl.load(preset).to(device)
        optimizer = build_optimizer(ours, 1e-4, 0.1)
        return ours, lambda batch: ours_step(ours, optimizer, batch, 1.0)
    import open_clip

    oc_cfg = CLIPConfig.from_name(preset).to_open_clip_dict()
    theirs = open_clip.model.CLIP(oc_cfg["embed_dim"], oc_cfg["vision_cfg"], oc_cfg["text_cfg"],
                                  quick_gelu=oc_cfg["quick_gelu"], output_dict=True)
    if same_weights:
        theirs.load_state_dict(to_open_clip(clip_pacl.load(preset).state_dict()))
    theirs.to(device)
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                                  fused=device.type == "cuda" or None)
    loss_fn = open_clip.loss.ClipLoss()
    return theirs, lambda batch: open_clip_step(theirs, optimizer, batch, 1.0, loss_fn)


def make_batch(batch_size: int, image_size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
    return images, tokenize(coco_like_captions(batch_size)).to(device)


def bench_step(args, device: torch.device, preset: str, batch_size: int, image_size: int) -> list[dict]:
    batch = make_batch(batch_size, image_size, device)
    runners = {name: build_library(name, preset, device)[1] for name in ("clip_pacl", "open_clip")}
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name](batch)
            _sync(device)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    medians = {name: statistics.median(t) for name, t in wall.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu.items()}
    return [{"mode": "step", "library": name, "preset": preset, "batch_size": batch_size, "image_size": image_size,
             "steps_per_s": round(1 / medians[name], 3), "median_ms": round(1000 * medians[name], 2),
             "cpu_median_ms": round(1000 * cpu_medians[name], 2),
             "speedup_vs_open_clip": round(medians["open_clip"] / medians[name], 3),
             "cpu_speedup_vs_open_clip": round(cpu_medians["open_clip"] / cpu_medians[name], 3)}
            for name in wall]


def rss_child(library: str, preset: str, batch_size: int, image_size: int, steps: int) -> dict:
    """In a child process: train one library's model for `steps` steps on one batch; report memory."""
    after_import = current_rss_mb()
    device = torch.device("cpu")
    _, step = build_library(library, preset, device, same_weights=False)
    batch = make_batch(batch_size, image_size, device)
    for _ in range(steps):
        step(batch)
    return {"rss_after_import_mb": after_import, "peak_rss_mb": peak_rss_mb()}


def bench_rss(args, preset: str, batch_size: int, image_size: int) -> list[dict]:
    records = []
    for library in ("clip_pacl", "open_clip"):
        child = run_child([__file__, "--rss-child", library, "--configs", f"{preset}:{batch_size}:{image_size}",
                           "--steps", str(args.steps), "--threads", str(args.threads)])
        records.append({"mode": "rss", "library": library, "preset": preset, "batch_size": batch_size,
                        "image_size": image_size, **child})
    return records


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
    return [{"mode": "loop", "library": "clip_pacl", "preset": PRESET, "batch_size": args.batch_size,
             "image_size": args.image_size, "steps_per_s": round(statistics.median(rates), 3),
             "windows": len(rates), "log_every": args.log_every, "workers": args.workers}]


def print_table(records: list[dict]) -> None:
    for r in records:
        if r["mode"] == "step":
            print(f"step  {r['preset']:<9} batch {r['batch_size']:>4} {r['image_size']:>3}px  {r['library']:<9} "
                  f"{r['steps_per_s']:>7} steps/s  {r['median_ms']:>9} ms  x{r['speedup_vs_open_clip']} vs open_clip "
                  f"(cpu time x{r['cpu_speedup_vs_open_clip']})")
        elif r["mode"] == "rss":
            print(f"rss   {r['preset']:<9} batch {r['batch_size']:>4} {r['image_size']:>3}px  {r['library']:<9} "
                  f"peak {r['peak_rss_mb']} MiB (after import {r['rss_after_import_mb']})")
        else:
            print(f"loop  {r['preset']:<9} batch {r['batch_size']:>4} {r['image_size']:>3}px  {r['library']:<9} "
                  f"{r['steps_per_s']:>7} steps/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", default="step,loop", help="comma-separated: step, loop, rss")
    p.add_argument("--configs", default="tiny:128:64,ViT-B-32:16:224",
                   help="step and rss modes: comma-separated preset:batch:image_size (rss uses the first)")
    p.add_argument("--batch-size", type=int, default=128, help="loop mode: batch size")
    p.add_argument("--image-size", type=int, default=64, help="loop mode: image size")
    p.add_argument("--steps", type=int, default=20, help="timed steps (loop: the run's length; rss: steps trained)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (step mode)")
    p.add_argument("--log-every", type=int, default=5, help="loop mode: the run's --log-every (a timing window)")
    p.add_argument("--n-images", type=int, default=512, help="loop mode: synthetic training images")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="", help="free text stored with the results (e.g. the commit)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/clip_pacl_train_step"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, *configs[0], args.steps)))
        return
    device = torch.device(args.device)
    modes = args.modes.split(",")
    common = {"steps": args.steps, "device": args.device, "label": args.label, **machine_info(),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    records = []
    if "step" in modes:
        records += [r for config in configs for r in bench_step(args, device, *config)]
    if "rss" in modes:
        records += bench_rss(args, *configs[0])
    if "loop" in modes:
        records += bench_loop(args, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in records:
            f.write(json.dumps({**r, **common}) + "\n")
            print(json.dumps({**r, **common}))
    print_table(records)


if __name__ == "__main__":
    main()
