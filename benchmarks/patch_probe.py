"""What do a CLIP's patch tokens know locally? A supervised linear probe per patch, one per token source.

    python benchmarks/patch_probe.py --model CLIP --train SEGDIR --test SEGDIR [--n-train 1500] [--n-test 200]

Each patch of the model's grid is labelled with the mask class covering at least 60% of its pixels (other
patches, and patches that are mostly "ignore", are left out). A logistic-regression probe (Adam, 300 full-batch
steps on standardised features) is trained on the frozen tokens of --train and scored on --test, for:
  embed        the patch embedding plus position (the input of the first block)
  blockK       the output of block K
  tokens       the last block's output through ln_post and the projection (what `--method patch` and PACL's
               default `tokens` use)
  maskclip     MaskCLIP's value-path tokens (`--method maskclip`, PACL's `maskclip`)
Accuracy is reported over all labelled patches and over foreground (non-background) patches only: the second
says whether the class of an object is readable from each of its patches. This is an upper bound on what
open-vocabulary methods can localise from those tokens, measured with the masks that they never see.
Results are appended to benchmarks/results/patch_probe.jsonl. ViT models only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.data.segmentation import IGNORE_INDEX, open_segmentation_dataset
from clip_pacl.errors import ClipPaclError
from clip_pacl.segmentation.predict import _to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "patch_probe.jsonl"


def load(root: str, n: int, patch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images (B, 3, H, W), per-patch labels (B, N) with -1 = unlabelled, number of classes)."""
    dataset = open_segmentation_dataset(root)
    images, labels = [], []
    for i in range(min(n, len(dataset))):
        image, mask = dataset[i]
        images.append(_to_tensor(image.convert("RGB")))
        m = torch.from_numpy(np.asarray(mask).astype(np.int64))
        h, w = m.shape
        cells = m.view(h // patch, patch, w // patch, patch).permute(0, 2, 1, 3).reshape(-1, patch * patch)
        label = torch.mode(cells, dim=-1).values
        share = (cells == label[:, None]).float().mean(-1)
        label[(share < 0.6) | (label == IGNORE_INDEX)] = -1
        labels.append(label)
    return torch.stack(images), torch.stack(labels), len(dataset.class_names)


@torch.no_grad()
def token_sources(clip, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    visual = clip.visual
    for start in range(0, len(images), batch):
        x = visual.embed(images[start : start + batch])
        feats = {"embed": x[:, 1:]}
        for k, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            feats[f"block{k}"] = x[:, 1:]
        feats["tokens"] = clip.encode_image_tokens(images[start : start + batch])[:, 1:]
        feats["maskclip"] = clip.encode_image_tokens(images[start : start + batch], dense="maskclip")[:, 1:]
        for name, f in feats.items():
            out.setdefault(name, []).append(f.float())
    return {name: torch.cat(parts) for name, parts in out.items()}


def probe(train_x, train_y, test_x, test_y, n_classes: int, steps: int = 300) -> tuple[float, float]:
    """(accuracy on labelled test patches, accuracy on labelled foreground test patches)."""
    train_x, test_x = train_x.reshape(-1, train_x.shape[-1]), test_x.reshape(-1, test_x.shape[-1])
    train_y, test_y = train_y.reshape(-1), test_y.reshape(-1)
    keep = train_y >= 0
    if not keep.any():
        raise SystemExit("error: no labelled patch in the training images (is the mask grid the model's?)")
    mean, std = train_x[keep].mean(0), train_x[keep].std(0) + 1e-6
    xs, ys = (train_x[keep] - mean) / std, train_y[keep]
    weight = torch.zeros(xs.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(xs @ weight + bias, ys) + 1e-4 * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (((test_x - mean) / std) @ weight + bias).argmax(-1)
    labelled, foreground = test_y >= 0, test_y > 0
    if not foreground.any():
        raise SystemExit("error: no labelled foreground patch in the test images; use more --n-test images")
    return ((pred[labelled] == test_y[labelled]).float().mean().item(),
            (pred[foreground] == test_y[foreground]).float().mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a ViT CLIP (checkpoint dir, file or preset)")
    ap.add_argument("--train", required=True, nargs="+", help="segmentation dirs to fit probes on")
    ap.add_argument("--test", required=True, nargs="+", help="segmentation dirs to score them on (same order)")
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if len(args.train) != len(args.test):
        raise SystemExit("error: give one --test dir per --train dir")
    torch.manual_seed(args.seed)
    clip = clip_pacl.load(args.model, random_weights=True).eval()
    if clip.config.vision.is_resnet:
        raise SystemExit("error: the probe reads ViT blocks; this model has a ResNet image tower")
    patch = clip.config.vision.patch_size
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    for train_dir, test_dir in zip(args.train, args.test):
        train_images, train_labels, n_classes = load(train_dir, args.n_train, patch)
        test_images, test_labels, _ = load(test_dir, args.n_test, patch)
        train_feats, test_feats = token_sources(clip, train_images), token_sources(clip, test_images)
        for name in train_feats:
            acc, fg = probe(train_feats[name], train_labels, test_feats[name], test_labels, n_classes)
            print(f"{Path(test_dir).name:22s} {name:9s} accuracy {acc:.3f}  foreground accuracy {fg:.3f}", flush=True)
            append_jsonl(args.out, [{"run": run_id, "model": args.model, "train": train_dir, "test": test_dir,
                                     "source": name, "accuracy": round(acc, 4), "foreground_accuracy": round(fg, 4),
                                     "n_train": len(train_images), "n_test": len(test_images)}])


if __name__ == "__main__":
    try:
        main()
    except ClipPaclError as e:  # a missing or unreadable model or dataset: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
