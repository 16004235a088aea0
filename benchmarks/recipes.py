"""Training recipes side by side: clip-pacl's defaults against open_clip's training script and a plain AdamW loop,
on generated datasets of different kinds, several seeds each, at one budget.

Every run trains the same small ViT CLIP (MODEL below) for the same steps, batch size and peak lr on the same
pairs in the same order (one seeded sampler), then is scored by the same held-out evaluation: zero-shot top-1
on held-out images (the set's labels, class names and templates) and text->image recall@1 over the held-out
captions. Recipes:

- `clip-pacl`: `clip_pacl.train.train` with its defaults (what `clip-pacl train` does with no recipe flags);
  `clip-pacl:beta2=0.999,grad_clip=0` overrides TrainConfig fields (values as JSON) to try a variant.
- `open_clip_train`: open_clip's own `train_one_epoch`, `ClipLoss`, `cosine_lr` and parameter-group rule over
  `open_clip.CLIP`, with its script's argparse defaults for a ViT: AdamW betas (0.9, 0.98), eps 1e-6, wd 0.2,
  no gradient clipping, cosine schedule, RandomResizedCrop(0.9, 1) augmentation. Its default warmup (10,000
  steps) is longer than these whole runs, so it gets the same fraction of the run as open_clip's published
  LAION-400M schedule gives it, rounded up: 10% of the steps (--oc-warmup-fraction).
- `plain`: a plain PyTorch loop over `open_clip.CLIP` at PyTorch's defaults: `AdamW(model.parameters(), lr)`
  (betas (0.9, 0.999), eps 1e-8, wd 0.01 on every parameter), `OneCycleLR`, no augmentation, no clipping.

    python benchmarks/recipes.py --steps 400 --n-train 3000 --tag final400 --seeds 0 1 2 3 4 \
        --recipes clip-pacl plain open_clip_train    # the README's table (~25 min on 2 quiet CPU cores)
    python benchmarks/recipes.py --quick --out /tmp/r.jsonl   # smoke test, seconds
    python benchmarks/recipes.py --table benchmarks/results/recipes.jsonl --tag final400   # the table again
    python benchmarks/recipes.py --table benchmarks/results/recipes.jsonl --tag final400 --compare clip-pacl
        # ... and clip-pacl minus each alternative, seed by seed, with 95% intervals

A record's `recipe` is read against today's defaults; where the defaults changed since a run, its record was
relabelled with the explicit overrides that reproduce it (the original spec kept as `recipe_as_run`).

Appends one JSON line per run to benchmarks/results/recipes.jsonl and prints mean +- std (min..max) per dataset
and recipe.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "recipes.jsonl"
KINDS = ("shapes", "counts", "patterns")
RECIPES = ("clip-pacl", "open_clip_train", "plain")

# A small ViT CLIP (issue 10's width and patch, fewer layers, at 32 px so that 27+ runs fit a shared 2-core CPU):
# 2+2 layers of width 128, patch 8 (16 patches), QuickGELU.
MODEL = {"embed_dim": 128, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32, "patch_size": 8},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}}


def model_dict(image_size: int, layers: int) -> dict:
    """MODEL at another input size and depth (both towers); issue 10's own model is `--image-size 64 --layers 3`."""
    return {**MODEL, "vision_cfg": {**MODEL["vision_cfg"], "image_size": image_size, "layers": layers},
            "text_cfg": {**MODEL["text_cfg"], "layers": layers}}


# ---------------------------------------------------------------------------------------------- data
def make_data(workdir: Path, kind: str, n_train: int, n_heldout: int, image_size: int):
    """The generated set (data seed 0 for every run: seeds vary the training, not the data)."""
    from clip_pacl.data.synthetic_kinds import generate

    out = workdir / f"{kind}-{n_train}-{n_heldout}-{image_size}"
    done = out / "done.json"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        info = generate(kind, out, n_train, seed=0, image_size=image_size, captions_per_image=2, heldout=n_heldout)
        done.write_text(json.dumps(info.to_dict()))
    return SimpleNamespace(**json.loads(done.read_text()))


class StepSampler(Sampler):
    """`steps * batch_size` (index, seed) pairs: clip-pacl's EpochSampler epochs one after another, so every
    recipe sees exactly the pairs (and crop seeds) `clip_pacl.train` sees in its first `steps` steps."""

    def __init__(self, n: int, steps: int, batch_size: int, seed: int):
        from clip_pacl.data import EpochSampler

        self.sampler = EpochSampler(n, batch_size=batch_size, shuffle=True, seed=seed)
        self.per_epoch = n // batch_size
        self.steps, self.batch_size = steps, batch_size

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(self._epochs(), len(self))

    def _epochs(self) -> Iterator[tuple[int, int]]:
        for epoch in itertools.count():
            self.sampler.set_epoch(epoch)
            yield from itertools.islice(self.sampler, self.per_epoch * self.batch_size)  # whole batches, as train


def loader(data, config, steps: int, batch_size: int, seed: int, augment: bool) -> DataLoader:
    from clip_pacl.data import CaptionDataset, read_caption_rows
    from clip_pacl.tokenizer import get_tokenizer
    from clip_pacl.transforms import image_transform

    dataset = CaptionDataset(read_caption_rows(data.captions), image_transform(config.vision.image_size, augment),
                             get_tokenizer(config.text.context_length))
    sampler = StepSampler(len(dataset), steps, batch_size, seed)
    batches = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                         collate_fn=lambda items: (torch.stack([i[0] for i in items]),
                                                   torch.stack([i[1] for i in items])))
    batches.num_batches, batches.num_samples = steps, steps * batch_size  # what open_clip_train reads
    return batches


def held_out(model: torch.nn.Module, data) -> dict[str, float]:
    """The same evaluation for every recipe (open_clip models are converted to ours first)."""
    from clip_pacl.data import read_caption_rows, read_label_rows
    from clip_pacl.retrieval.evaluate import evaluate_retrieval
    from clip_pacl.zeroshot.evaluate import evaluate_zeroshot
    from clip_pacl.zeroshot.templates import resolve_templates

    model.eval()
    zs = evaluate_zeroshot(model, read_label_rows(data.labels_heldout), resolve_templates(data.templates),
                           class_names=data.label_classes, progress=False)
    recall = evaluate_retrieval(model, read_caption_rows(data.captions_heldout), progress=False)
    return {"zeroshot_top1": round(zs["top1"], 4), "chance": round(1 / zs["num_classes"], 4),
            "zeroshot_images": zs["num_images"], "t2i_R@1": round(recall["text_to_image_R@1"], 4),
            "i2t_R@1": round(recall["image_to_text_R@1"], 4), "heldout_images": recall["num_images"]}


# ---------------------------------------------------------------------------------------------- recipes
def parse_recipe(spec: str) -> tuple[str, dict]:
    """"clip-pacl:beta2=0.999,grad_clip=0" -> ("clip-pacl", {"beta2": 0.999, "grad_clip": 0})."""
    name, _, rest = spec.partition(":")
    if name not in RECIPES:
        raise SystemExit(f"error: unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    if overrides and name != "clip-pacl":
        raise SystemExit(f"error: only clip-pacl takes overrides (got {spec!r})")
    return name, overrides


def run_clip_pacl(data, args, seed: int, overrides: dict, run_dir: Path) -> tuple[float, torch.nn.Module]:
    import clip_pacl
    from clip_pacl.train import TrainConfig, train

    model_json = run_dir.parent / f"{run_dir.name}.model.json"  # beside the run: `out` must start empty
    model_json.write_text(json.dumps(args.model))
    config = TrainConfig(data=str(data.captions), model=str(model_json), out=str(run_dir), steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=seed, device="cpu", log_every=50,
                         progress=False, workers=0, **overrides)  # workers=0: each run is a pool process already
    start = time.perf_counter()
    try:
        result = train(config)
    finally:
        model_json.unlink()
    return time.perf_counter() - start, clip_pacl.load(result.final_model)


def _open_clip_model(config, seed: int):
    import open_clip

    torch.manual_seed(seed)
    oc = config.to_open_clip_dict()
    return open_clip.CLIP(oc["embed_dim"], oc["vision_cfg"], oc["text_cfg"], quick_gelu=oc["quick_gelu"],
                          output_dict=True)


def _to_ours(model, config) -> torch.nn.Module:
    import clip_pacl
    from clip_pacl.formats.convert_open_clip import from_open_clip

    ours = clip_pacl.CLIP(config)
    ours.load_state_dict(from_open_clip(model.state_dict()))
    return ours


def run_open_clip_train(data, args, seed: int, config) -> tuple[float, torch.nn.Module]:
    import open_clip
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    start = time.perf_counter()
    model = _open_clip_model(config, seed)
    batches = loader(data, config, args.steps, args.batch_size, seed, augment=True)

    def exclude(n, p):  # open_clip_train.main's rule: no decay on gains, biases, the temperature
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = math.ceil(args.oc_warmup_fraction * args.steps)
    scheduler = cosine_lr(optimizer, args.lr, warmup, args.steps)
    targs = SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                            horovod=False, grad_clip_norm=None, log_every_n_steps=10**9, batch_size=args.batch_size,
                            world_size=1, rank=0, local_rank=0, wandb=False)
    data_info = SimpleNamespace(dataloader=batches, set_epoch=lambda epoch: None)
    train_one_epoch(model, {"train": data_info}, open_clip.loss.ClipLoss(), 0, optimizer, None, scheduler, None,
                    targs)
    return time.perf_counter() - start, _to_ours(model, config)


def run_plain(data, args, seed: int, config) -> tuple[float, torch.nn.Module]:
    import open_clip

    start = time.perf_counter()
    model = _open_clip_model(config, seed)
    batches = loader(data, config, args.steps, args.batch_size, seed, augment=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    loss_fn = open_clip.loss.ClipLoss()
    model.train()
    for images, texts in batches:
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return time.perf_counter() - start, _to_ours(model, config)


def one_run(job: tuple) -> dict:
    """One (dataset, seed, recipe) run in a worker process with one thread."""
    kind, seed, spec, data, args = job
    torch.set_num_threads(1)
    from clip_pacl.config import CLIPConfig

    config = CLIPConfig.from_open_clip_dict(args.model)
    name, overrides = parse_recipe(spec)
    run_dir = args.workdir / "runs" / f"{kind}-{seed}-{spec.replace(':', '_').replace(',', '_')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if name == "clip-pacl":
        seconds, model = run_clip_pacl(data, args, seed, overrides, run_dir)
    elif name == "open_clip_train":
        seconds, model = run_open_clip_train(data, args, seed, config)
    else:
        seconds, model = run_plain(data, args, seed, config)
    metrics = held_out(model, data)
    metrics["trained"] = {"image_size": model.config.vision.image_size, "layers": [model.config.vision.layers,
                          model.config.text.layers], "params": sum(p.numel() for p in model.parameters())}
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"tag": args.tag, "dataset": kind, "recipe": spec, "seed": seed, "seconds": round(seconds, 2), **metrics,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "n_train": args.n_train,
            "n_heldout": args.n_heldout, "model": args.model, "threads": 1, "jobs": args.jobs,
            "torch": torch.__version__,
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ---------------------------------------------------------------------------------------------- report
METRICS = (("zeroshot_top1", "zero-shot top-1"), ("t2i_R@1", "text->image R@1"))  # (record key, column name)


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} +- {std:.3f} ({min(values):.3f}..{max(values):.3f})"


def table(records: list[dict]) -> str:
    """Markdown: one row per (dataset, recipe): zero-shot top-1 and text->image R@1 as mean +- std (min..max)
    over seeds, and mean training seconds; datasets in KINDS order, recipes alphabetically."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["recipe"]), []).append(r)
    columns = " | ".join(f"{name} (held out)" for _, name in METRICS)
    lines = [f"| dataset | recipe | seeds | {columns} | train s |", "|---|---|---|---|---|---|"]
    for (kind, recipe), rs in sorted(groups.items(), key=lambda item: (KINDS.index(item[0][0]), item[0][1])):
        chance = f" (chance {rs[0]['chance']:.3f})" if rs[0].get("chance") else ""
        spreads = " | ".join(_spread([r[key] for r in rs]) for key, _ in METRICS)
        lines.append(f"| {kind}{chance} | {recipe} | {len(rs)} | {spreads} | "
                     f"{statistics.fmean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


# two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond, the normal's 1.96 is within 2%
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed differences and its 95% t-interval (seeds are the pairing: the same
    data order, crops and evaluation for both recipes)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("-inf"), float("inf")
    half = T975[min(len(diffs) - 1, len(T975)) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def compare(records: list[dict], ours: str) -> str:
    """Markdown: per dataset and other base recipe, `ours` minus it over their common seeds, mean and 95% interval.
    An interval above 0 is a win, one below 0 a loss, one across 0 a difference these seeds cannot resolve."""
    by_key = {(r["dataset"], r["recipe"], r["seed"]): r for r in records}
    columns = " | ".join(f"{name} (95% interval)" for _, name in METRICS)
    lines = [f"| dataset | {ours} minus | seeds | {columns} |", "|---|---|---|---|---|"]
    for kind in KINDS:
        for other in RECIPES:
            if other == ours:
                continue
            seeds = sorted(seed for (k, recipe, seed) in by_key if k == kind and recipe == ours
                           and (kind, other, seed) in by_key)
            if not seeds:
                continue
            cells = []
            for key, _ in METRICS:
                diffs = [by_key[(kind, ours, s)][key] - by_key[(kind, other, s)][key] for s in seeds]
                mean, low, high = paired_interval(diffs)
                cells.append(f"{mean:+.3f} ({low:+.3f}..{high:+.3f})")
            lines.append(f"| {kind} | {other} | {len(seeds)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe names, clip-pacl:key=value,...")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-train", type=int, default=1500, help="training images (2 captions each)")
    p.add_argument("--n-heldout", type=int, default=300, help="held-out images for the evaluation")
    p.add_argument("--image-size", type=int, default=MODEL["vision_cfg"]["image_size"],
                   help="image size of the data and the model (patch 8)")
    p.add_argument("--layers", type=int, default=MODEL["vision_cfg"]["layers"], help="layers of each tower")
    p.add_argument("--oc-warmup-fraction", type=float, default=0.1, help="open_clip_train's warmup, as a fraction")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny data, 3 steps, 1 seed)")
    p.add_argument("--tag", default="", help="a label stored with every record")
    p.add_argument("--table", type=Path, metavar="JSONL", help="only print the table of JSONL's records (--tag)")
    p.add_argument("--compare", metavar="RECIPE", help="with --table: also RECIPE minus each base recipe over their "
                   "common seeds, mean and 95%% interval of the paired differences")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/clip_pacl_recipes"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.table:
        if not args.table.is_file():
            raise SystemExit(f"error: {args.table} does not exist")
        records = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        records = [r for r in records if r.get("tag", "") == args.tag]
        print(table(records))
        if args.compare:
            print()
            print(compare(records, args.compare))
        return
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.n_train, args.n_heldout = args.seeds[:1], 3, 8, 16, 8

    args.model = model_dict(args.image_size, args.layers)
    datas = {kind: make_data(args.workdir, kind, args.n_train, args.n_heldout, args.image_size)
             for kind in args.kinds}
    jobs = [(kind, seed, spec, datas[kind], args) for seed in args.seeds for kind in args.kinds
            for spec in args.recipes]
    for spec in args.recipes:
        parse_recipe(spec)  # fail before any work
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for record in pool.imap_unordered(one_run, jobs):
            records.append(record)
            append_jsonl(args.out, [record])
            print(f"{record['dataset']:9s} {record['recipe']:20s} seed {record['seed']}: zero-shot "
                  f"{record['zeroshot_top1']:.3f} R@1 {record['t2i_R@1']:.3f} {record['seconds']:.0f}s",
                  file=sys.stderr, flush=True)
    print(table(records))


if __name__ == "__main__":
    main()
