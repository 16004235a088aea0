"""Train the `tiny` CLIP with clip-pacl and with open_clip's own training code, side by side, and compare.

Both runs start from the same initial weights (ours, converted to open_clip's keys), see the same
pairs with the same augmentations in the same order (one seeded sampler), use AdamW with the same
betas/eps/lr, warmup + cosine schedule, gradient clipping and steps. open_clip's side is its real
`open_clip_train.train.train_one_epoch` with `ClipLoss`, its parameter-group rule and `cosine_lr`;
clip-pacl's side is `clip_pacl.train.train` (which also writes its checkpoint, metrics and plot).
Both trained models are then scored by the same held-out evaluation (retrieval recall@1 both ways,
zero-shot shape and colour accuracy) on a synthetic test set drawn with another seed.

    python benchmarks/train_vs_open_clip.py                  # defaults below, CPU, 2 threads
    python benchmarks/train_vs_open_clip.py --epochs 2 --n-train 256 --n-test 100   # a quick look

Appends one JSON line per trainer and one comparison line to benchmarks/results/train_vs_open_clip.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

import clip_pacl
from clip_pacl.config import CLIPConfig
from clip_pacl.data import CaptionDataset, EpochSampler, read_caption_rows, read_label_rows
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.formats.convert_open_clip import from_open_clip, to_open_clip
from clip_pacl.retrieval.evaluate import evaluate_retrieval
from clip_pacl.tokenizer import get_tokenizer
from clip_pacl.train import TrainConfig, train
from clip_pacl.transforms import image_transform
from clip_pacl.zeroshot.evaluate import evaluate_zeroshot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_vs_open_clip.jsonl"
PRESET = "tiny"


def synthetic_sets(workdir: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    train_dir, test_dir = workdir / f"train-{n_train}", workdir / f"test-{n_test}"
    if not (train_dir / "captions.csv").is_file():
        generate_synthetic(train_dir, n_train, seed=0, image_size=64)
    if not (test_dir / "captions.csv").is_file():
        generate_synthetic(test_dir, n_test, seed=1, image_size=64)  # another seed: unseen images
    return train_dir, test_dir


def held_out(model: torch.nn.Module, test_dir: Path) -> dict[str, float]:
    """The same evaluation for both trainers' models (open_clip's is converted to ours, verified equal to 1e-7)."""
    model.eval()
    recall = evaluate_retrieval(model, read_caption_rows(test_dir / "captions.csv"), progress=False)
    out = {"text_to_image_R@1": recall["text_to_image_R@1"], "image_to_text_R@1": recall["image_to_text_R@1"]}
    for task in ("shapes", "colors"):
        result = evaluate_zeroshot(model, read_label_rows(test_dir / f"{task}.csv"), ["a photo of a {}."],
                                   progress=False)
        out[f"zeroshot_{task}_top1"] = result["top1"]
        out[f"zeroshot_{task}_chance"] = 1 / result["num_classes"] if "num_classes" in result else None
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def initial_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # exactly what clip_pacl.train does before building the model
    return clip_pacl.load(PRESET, random_weights=True).state_dict()


def run_clip_pacl(args, train_dir: Path, workdir: Path) -> tuple[float, torch.nn.Module]:
    run_dir = workdir / "run-clip_pacl"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(data=str(train_dir / "captions.csv"), model=PRESET, out=str(run_dir),
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, wd=args.wd, warmup=args.warmup,
                         grad_clip=args.grad_clip, seed=args.seed, workers=args.workers, device="cpu",
                         log_every=10, progress=False)
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    return seconds, clip_pacl.load(result.final_model)


def collate_pairs(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's batches are (images, texts) tuples; the synthetic set has no unreadable images."""
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


class _DataInfo(SimpleNamespace):
    """open_clip_train.data.DataInfo without its pandas import: the loader; the epoch is set on our sampler."""

    def __init__(self, dataloader: DataLoader):
        super().__init__(dataloader=dataloader)

    def set_epoch(self, epoch: int) -> None:
        pass


def run_open_clip(args, train_dir: Path, workdir: Path) -> tuple[float, torch.nn.Module, int]:
    import open_clip
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    config = CLIPConfig.from_name(PRESET)
    oc = config.to_open_clip_dict()
    model = open_clip.model.CLIP(oc["embed_dim"], oc["vision_cfg"], oc["text_cfg"], quick_gelu=oc["quick_gelu"],
                                 output_dict=True)
    model.load_state_dict(to_open_clip(initial_weights(args.seed)))

    # The same pairs, augmentations and order as clip-pacl's loader: one seeded sampler, (index, seed) keys.
    rows = read_caption_rows(train_dir / "captions.csv")
    dataset = CaptionDataset(rows, image_transform(config.vision.image_size, train=True),
                             get_tokenizer(config.text.context_length))
    sampler = EpochSampler(len(dataset), batch_size=args.batch_size, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers,
                        collate_fn=collate_pairs)
    loader.num_batches, loader.num_samples = len(loader), len(loader) * args.batch_size
    steps = len(loader) * args.epochs

    # open_clip_train.main's parameter groups and optimiser
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": args.wd}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, steps)
    targs = SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                            horovod=False, grad_clip_norm=args.grad_clip, log_every_n_steps=10**9,
                            batch_size=args.batch_size, world_size=1, rank=0, local_rank=0, wandb=False)
    loss = open_clip.loss.ClipLoss()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        train_one_epoch(model, {"train": _DataInfo(loader)}, loss, epoch, optimizer, None, scheduler, None, targs)
    seconds = time.perf_counter() - start
    ours = clip_pacl.CLIP(config)
    ours.load_state_dict(from_open_clip(model.state_dict()))
    return seconds, ours, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/clip_pacl_train_bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train_dir, test_dir = synthetic_sets(args.workdir, args.n_train, args.n_test)

    common = {"preset": PRESET, "n_train": args.n_train, "n_test": args.n_test, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd, "warmup": args.warmup, "seed": args.seed,
              "threads": args.threads, "workers": args.workers, "torch": torch.__version__,
              "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    oc_seconds, oc_model, steps = run_open_clip(args, train_dir, args.workdir)
    oc_metrics = held_out(oc_model, test_dir)
    ours_seconds, ours_model = run_clip_pacl(args, train_dir, args.workdir)
    ours_metrics = held_out(ours_model, test_dir)
    records = [
        {"trainer": "open_clip", "steps": steps, "seconds": round(oc_seconds, 2), **oc_metrics, **common},
        {"trainer": "clip_pacl", "steps": steps, "seconds": round(ours_seconds, 2), **ours_metrics, **common},
    ]
    acc_keys = ("text_to_image_R@1", "image_to_text_R@1", "zeroshot_shapes_top1", "zeroshot_colors_top1")
    records.append({"trainer": "ratio clip_pacl/open_clip", "time_ratio": round(ours_seconds / oc_seconds, 3),
                    **{f"{k}_diff": round(ours_metrics[k] - oc_metrics[k], 4) for k in acc_keys}, **common})
    append_jsonl(args.out, records)
    for r in records:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
