"""Training-step throughput: clip-pacl's step vs open_clip's on the same model, and clip-pacl's whole loop.

`step`: for each --configs entry (preset:batch:image size; by default `tiny` at 64 px batch 128 and ViT-B-32 at
224 px batch 16), identical weights in both libraries, one in-memory batch (random images, COCO-like captions
tokenized to the 77-token context); one step = forward, CLIP loss, backward, gradient clipping, AdamW. clip-pacl's
side is what its loop does with a loader batch: `trim_text_padding` (the token ids cut after the longest caption, on
the host), `clip_pacl.train.accumulate_gradients`, `clip_grad_norm_` and its fused AdamW; open_clip's is its `CLIP`
model with `ClipLoss` and AdamW, as open_clip_train runs them (PyTorch's default AdamW on CPU; on CUDA the fused
one, like clip-pacl's, where open_clip_train would take the slower foreach default). Steps alternate
between the libraries after warm-up; the median time gives steps/s and samples/s (wall clock, and process CPU time,
which a shared machine stretches less). Every step is timed from and to an idle device (torch.cuda.synchronize).

--amp bf16 runs both libraries' forward and loss under torch.autocast(bfloat16), as open_clip_train's
`--precision amp_bf16` does; --compile [BACKEND] wraps both libraries' models in torch.compile (inductor unless
BACKEND says otherwise) the way their training scripts do (clip-pacl's loop compiles `FeatureModel`, open_clip_train
the `CLIP` module; the loss, clipping and AdamW stay eager in both). The warm-up steps (at least one with --compile)
absorb compilation; `warmup_excess_s` is how much longer they took than as many timed steps (with --compile: mostly
compilation). MFU: `train_flops_per_sample` is 3x the plain forward's FLOPs on one sample (torch.utils.flop_counter
on clip-pacl's model, both towers at the full 77-token context, attention included; the loss's B x B logits are not
counted), the same nominal work for both libraries (clip-pacl's trimmed text does less and counts as speed);
achieved FLOP/s over the matmul peak measured at the start of the same run (`machine.matmul_peak`: torch.mm at
8192^3 on a GPU, 2048^3 on CPU, in bfloat16 with --amp bf16, else float32). On CUDA `peak_step_cuda_mib` is the most
memory a timed step allocated beyond what was held when it started (torch.cuda.max_memory_allocated).

`loop`: `clip_pacl.train.train` on the built-in synthetic set (decoding, augmentation, the loop's logging and
host syncs included), steps/s from the loop's own `samples_per_s` windows after the first (warm-up) one.

`rss`: peak resident memory (ru_maxrss) of training the first --configs entry for --steps steps, each library in a
child process of its own that builds only its own model; on CUDA also the allocator's peak (`peak_cuda_mib`).

    python benchmarks/train_step.py --modes step --configs tiny:128:64,ViT-B-32:16:224 --steps 5 --threads 2
    python benchmarks/train_step.py --modes rss --configs tiny:128:64 --steps 5 --threads 2
    python benchmarks/train_step.py --device cuda --modes step --configs ViT-B-16:256:224 --amp bf16 --compile

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
from clip_pacl.config import CLIPConfig
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.formats.convert_open_clip import to_open_clip
from clip_pacl.losses import get_objective
from clip_pacl.tokenizer import tokenize
from clip_pacl.train import TrainConfig, accumulate_gradients, train
from clip_pacl.train.optim import build_optimizer
from clip_pacl.train.setup import FeatureModel

sys.path.insert(0, str(Path(__file__).parent))
from encode import AMP_DTYPES, autocast, coco_like_captions, counted_flops  # noqa: E402
from machine import (  # noqa: E402
    allocated_mib,
    current_rss_mb,
    device_or_exit,
    machine_info,
    matmul_peak,
    peak_memory_mib,
    peak_rss_mb,
    reset_peak_memory,
    run_child,
    synchronize,
)

RESULTS = Path(__file__).parent / "results" / "train_step.jsonl"
PRESET = "tiny"  # loop mode
LIBRARIES = ("clip_pacl", "open_clip")


def ours_step(model: torch.nn.Module, feature_model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch,
              clip: float, context) -> None:
    """clip-pacl: the loop's host-side text trim, the batch to the device, gradient computation (forward and loss
    under `context`), clipping and AdamW."""
    images, texts = batch
    device = model.logit_scale.device
    images = images.to(device, non_blocking=True)
    texts = model.trim_text_padding(texts).to(device, non_blocking=True)
    accumulate_gradients(feature_model, get_objective("clip"), [(images, texts)], autocast=context)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def open_clip_step(model: torch.nn.Module, forward, optimizer: torch.optim.Optimizer, batch, clip: float, loss_fn,
                   context) -> None:
    """open_clip: open_clip_train's step (accum_freq 1): the batch to the device, forward and loss under `context`
    (its autocast), backward, clipping, AdamW."""
    device = model.logit_scale.device
    images, texts = (t.to(device, non_blocking=True) for t in batch)
    with context():
        out = forward(images, texts)
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


def build_library(library: str, preset: str, device: torch.device, same_weights: bool = True, amp: str = "none",
                  compile: str | None = None):
    """(model, step function taking a host or device batch) for one library. With `same_weights` open_clip's model
    gets clip-pacl's seeded weights (converted); without (memory measurements), each library builds only its own
    model. `amp` and `compile` (a torch.compile backend, or None) apply to both libraries alike (see the module
    docstring)."""
    torch.manual_seed(0)
    context = autocast(amp, device)
    if library == "clip_pacl":
        ours = clip_pacl.load(preset, random_weights=True).to(device)
        optimizer = build_optimizer(ours, 1e-4, 0.1)
        feature_model = torch.compile(FeatureModel(ours), backend=compile) if compile else FeatureModel(ours)
        return ours, lambda batch: ours_step(ours, feature_model, optimizer, batch, 1.0, context)
    import open_clip

    oc_cfg = CLIPConfig.from_name(preset).to_open_clip_dict()
    theirs = open_clip.model.CLIP(oc_cfg["embed_dim"], oc_cfg["vision_cfg"], oc_cfg["text_cfg"],
                                  quick_gelu=oc_cfg["quick_gelu"], output_dict=True)
    if same_weights:
        theirs.load_state_dict(to_open_clip(clip_pacl.load(preset, random_weights=True).state_dict()))
    theirs.to(device)
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                                  fused=device.type == "cuda" or None)
    loss_fn = open_clip.loss.ClipLoss()
    forward = torch.compile(theirs, backend=compile) if compile else theirs
    return theirs, lambda batch: open_clip_step(theirs, forward, optimizer, batch, 1.0, loss_fn, context)


def make_batch(batch_size: int, image_size: int, device: torch.device):
    """One in-memory batch: images already on the device, token ids on the host (pinned on a GPU), where the loop's
    loader leaves them: each step moves them (clip-pacl after trimming them)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
    texts = tokenize(coco_like_captions(batch_size))
    return images, texts.pin_memory() if device.type == "cuda" else texts


def time_steps(runners: dict, batch, warmup: int, steps: int, device: torch.device) -> dict[str, dict[str, list]]:
    """Per library: wall and CPU seconds of each timed step, wall seconds of each warm-up step and (CUDA) the peak
    memory each timed step allocated beyond what it started with, in MiB. Libraries alternate step by step."""
    times = {name: {"wall": [], "cpu": [], "warmup": [], "memory": []} for name in runners}
    for i in range(warmup + steps):
        for name in list(runners) if i % 2 == 0 else list(reversed(runners)):
            synchronize(device)
            reset_peak_memory(device)
            held = allocated_mib(device) if device.type == "cuda" else 0.0
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name](batch)
            synchronize(device)
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if i < warmup:
                times[name]["warmup"].append(wall)
                continue
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
            if device.type == "cuda":
                times[name]["memory"].append(peak_memory_mib(device) - held)
    return times


def train_flops_per_sample(model: torch.nn.Module, batch) -> int:
    """3x the FLOPs of the plain forward (both towers, full context, no trim) on one sample of `batch`."""
    images, texts = batch
    return 3 * counted_flops(lambda: model(images[:1], texts[:1].to(images.device)))


def bench_step(args, device: torch.device, peak: dict, preset: str, batch_size: int, image_size: int) -> list[dict]:
    batch = make_batch(batch_size, image_size, device)
    built = {name: build_library(name, preset, device, amp=args.amp, compile=args.compile) for name in LIBRARIES}
    times = time_steps({name: step for name, (_, step) in built.items()}, batch, args.warmup, args.steps, device)
    flops = train_flops_per_sample(built["clip_pacl"][0], batch)
    medians = {name: statistics.median(t["wall"]) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    records = []
    for name, t in times.items():
        achieved = flops * batch_size / medians[name]
        record = {"mode": "step", "library": name, "preset": preset, "batch_size": batch_size,
                  "image_size": image_size, "amp": args.amp, "compile": args.compile,
                  "steps_per_s": round(1 / medians[name], 3), "samples_per_s": round(batch_size / medians[name], 1),
                  "median_ms": round(1000 * medians[name], 2), "cpu_median_ms": round(1000 * cpu_medians[name], 2),
                  "speedup_vs_open_clip": round(medians["open_clip"] / medians[name], 3),
                  "cpu_speedup_vs_open_clip": round(cpu_medians["open_clip"] / cpu_medians[name], 3),
                  "warmup_excess_s": round(sum(t["warmup"]) - len(t["warmup"]) * medians[name], 3),
                  "train_flops_per_sample": flops, "achieved_gflop_s": round(achieved / 1e9, 1),
                  "mfu_pct": round(100 * achieved / 1e9 / peak["peak_gflop_s"], 2), **peak}
        if t["memory"]:
            record["peak_step_cuda_mib"] = round(max(t["memory"]), 1)
        records.append(record)
    return records


def rss_child(args, library: str, preset: str, batch_size: int, image_size: int) -> dict:
    """In a child process: train one library's model for --steps steps on one batch; report memory (on CUDA also the
    allocator's peak: weights, optimizer state, activations)."""
    after_import = current_rss_mb()
    device = device_or_exit(args.device)
    _, step = build_library(library, preset, device, same_weights=False, amp=args.amp, compile=args.compile)
    batch = make_batch(batch_size, image_size, device)
    for _ in range(args.steps):
        step(batch)
    synchronize(device)
    memory = {"peak_cuda_mib": peak_memory_mib(device)} if device.type == "cuda" else {}
    return {"rss_after_import_mb": after_import, "peak_rss_mb": peak_rss_mb(), **memory}


def bench_rss(args, preset: str, batch_size: int, image_size: int) -> list[dict]:
    records = []
    flags = ["--device", args.device, "--amp", args.amp] + (["--compile", args.compile] if args.compile else [])
    for library in LIBRARIES:
        child = run_child([__file__, "--rss-child", library, "--configs", f"{preset}:{batch_size}:{image_size}",
                           "--steps", str(args.steps), "--threads", str(args.threads), *flags])
        records.append({"mode": "rss", "library": library, "preset": preset, "batch_size": batch_size,
                        "image_size": image_size, "amp": args.amp, "compile": args.compile, **child})
    return records


def bench_loop(args, device: torch.device) -> list[dict]:
    data = args.workdir / f"synthetic-{args.n_images}-{args.image_size}"
    if not (data / "captions.csv").is_file():
        generate_synthetic(data, args.n_images, seed=0, image_size=args.image_size)
    run_dir = args.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(data=str(data / "captions.csv"), model=PRESET, out=str(run_dir), steps=args.steps,
                         batch_size=args.batch_size, image_size=args.image_size, device=device.type,
                         precision="fp32" if args.amp == "none" else args.amp, compile=bool(args.compile),
                         log_every=args.log_every, workers=args.workers, progress=False)
    train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] / args.batch_size for r in records if "samples_per_s" in r][1:]
    shutil.rmtree(run_dir, ignore_errors=True)
    return [{"mode": "loop", "library": "clip_pacl", "preset": PRESET, "batch_size": args.batch_size,
             "image_size": args.image_size, "amp": args.amp, "compile": args.compile,
             "steps_per_s": round(statistics.median(rates), 3),
             "windows": len(rates), "log_every": args.log_every, "workers": args.workers}]


def print_table(records: list[dict]) -> None:
    for r in records:
        if r["mode"] == "step":
            cuda = f"  step peak {r['peak_step_cuda_mib']} MiB" if "peak_step_cuda_mib" in r else ""
            print(f"step  {r['preset']:<9} batch {r['batch_size']:>4} {r['image_size']:>3}px  {r['library']:<9} "
                  f"{r['steps_per_s']:>7} steps/s {r['samples_per_s']:>9} samples/s  {r['median_ms']:>9} ms  "
                  f"x{r['speedup_vs_open_clip']} vs open_clip (cpu time x{r['cpu_speedup_vs_open_clip']})  "
                  f"MFU {r['mfu_pct']}% of {r['peak_gflop_s']} GFLOP/s {r['peak_dtype']}  "
                  f"warm-up +{r['warmup_excess_s']} s{cuda}")
        elif r["mode"] == "rss":
            cuda = f", CUDA peak {r['peak_cuda_mib']} MiB" if "peak_cuda_mib" in r else ""
            print(f"rss   {r['preset']:<9} batch {r['batch_size']:>4} {r['image_size']:>3}px  {r['library']:<9} "
                  f"peak {r['peak_rss_mb']} MiB (after import {r['rss_after_import_mb']}){cuda}")
        else:
            print(f"loop  {r['preset']:<9} batch {r['batch_size']:>4} {r['image_size']:>3}px  {r['library']:<9} "
                  f"{r['steps_per_s']:>7} steps/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="none",
                   help="bf16: forward and loss under torch.autocast(bfloat16), both libraries (loop: --precision)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile both libraries' models with BACKEND (default inductor; aot_eager traces "
                        "without generating code, a quick check); loop mode: the loop's --compile (inductor only)")
    p.add_argument("--modes", default="step,loop", help="comma-separated: step, loop, rss")
    p.add_argument("--configs", default="tiny:128:64,ViT-B-32:16:224",
                   help="step and rss modes: comma-separated preset:batch:image_size (rss uses the first)")
    p.add_argument("--batch-size", type=int, default=128, help="loop mode: batch size")
    p.add_argument("--image-size", type=int, default=64, help="loop mode: image size")
    p.add_argument("--steps", type=int, default=20, help="timed steps (loop: the run's length; rss: steps trained)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (step mode; at least 1 with --compile)")
    p.add_argument("--log-every", type=int, default=5, help="loop mode: the run's --log-every (a timing window)")
    p.add_argument("--n-images", type=int, default=512, help="loop mode: synthetic training images")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="", help="free text stored with the results (e.g. the commit)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/clip_pacl_train_step"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup 1 or more: compilation happens in the first steps")
    if args.compile not in (None, "inductor") and "loop" in args.modes.split(","):
        p.error(f"loop mode compiles with inductor (the loop's --compile), not {args.compile}")
    torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)
    if args.rss_child:
        print(json.dumps(rss_child(args, args.rss_child, *configs[0])))
        return
    device = device_or_exit(args.device)
    modes = args.modes.split(",")
    common = {"steps": args.steps, "label": args.label, **machine_info(device),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    records = []
    if "rss" in modes:  # first: a child's ru_maxrss starts at the parent's RSS when it was spawned (Linux keeps it)
        records += bench_rss(args, *configs[0])
    if "step" in modes:
        peak = matmul_peak(device, AMP_DTYPES[args.amp] or torch.float32)
        records += [r for config in configs for r in bench_step(args, device, peak, *config)]
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
