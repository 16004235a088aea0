"""PACL loss: our exact all-pairs formula against the naive ones, time and peak memory, forward + backward, CPU.

    python benchmarks/pacl_loss.py [--batch 64 128 256 512] [--patches 49] [--dim 512] [--out FILE]

Implementations (all give the same loss and gradients, see tests/test_pacl.py):
  exact         clip_pacl.losses.pacl.pacl_loss: <p, t> = sum_i a_i s_i, |p|^2 = a^T G a; largest tensor (B, B, N)
  materialised  the direct vectorisation: pool p for every pair as a (B, B, D) tensor, then the cosine
  loop          one (image, text) pair at a time in Python (run only up to --loop-max-batch: it is O(B^2)
                Python calls; bigger batches are reported as skipped, not estimated)
Each measurement runs in a fresh subprocess; peak memory is the growth of the process's peak RSS
(ru_maxrss) over its level once the inputs exist, so it counts every allocation of forward and backward.
Results go to benchmarks/results/pacl_loss.jsonl, one JSON object per (implementation, batch).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results" / "pacl_loss.jsonl"


def materialised_loss(patch_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    s = torch.einsum("bnd,cd->bcn", patch_emb, text_emb)  # (B, B, N)
    a = s.softmax(dim=-1)
    pooled = torch.einsum("bcn,bnd->bcd", a, patch_emb)  # (B, B, D): the tensor the exact formula avoids
    logits = logit_scale.exp() * F.cosine_similarity(pooled, text_emb[None], dim=-1)  # (B, B)
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def loop_loss(patch_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    rows = []
    for v in patch_emb:
        row = []
        for t in text_emb:
            a = (v @ t).softmax(dim=0)
            row.append(F.cosine_similarity(a @ v, t, dim=0))
        rows.append(torch.stack(row))
    logits = logit_scale.exp() * torch.stack(rows)
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # Linux reports KiB


def worker(impl: str, batch: int, patches: int, dim: int, repeats: int) -> dict:
    from clip_pacl.losses.pacl import pacl_loss

    fn = {"exact": pacl_loss, "materialised": materialised_loss, "loop": loop_loss}[impl]
    torch.manual_seed(0)
    patch_emb = F.normalize(torch.randn(batch, patches, dim), dim=-1).requires_grad_()
    text_emb = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    scale = torch.tensor(2.659, requires_grad=True)
    base = _peak_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = fn(patch_emb, text_emb, scale)
        loss.backward()
        times.append(time.perf_counter() - start)
        patch_emb.grad = text_emb.grad = scale.grad = None
    return {"impl": impl, "batch": batch, "patches": patches, "dim": dim, "loss": loss.item(),
            "seconds_fwd_bwd": min(times), "peak_extra_mib": (_peak_rss_bytes() - base) / 2**20,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--patches", type=int, default=49, help="patches per image (ViT-B/32 at 224 px: 49)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-max-batch", type=int, default=64)
    parser.add_argument("--impls", nargs="+", default=["exact", "materialised", "loop"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.patches, args.dim, args.repeats)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for batch in args.batch:
            for impl in args.impls:
                if impl == "loop" and batch > args.loop_max_batch:
                    record = {"impl": impl, "batch": batch, "patches": args.patches, "dim": args.dim,
                              "skipped": f"batch > --loop-max-batch {args.loop_max_batch}"}
                else:
                    repeats = 1 if impl == "loop" else args.repeats
                    cmd = [sys.executable, __file__, "--worker", impl, str(batch), "--patches", str(args.patches),
                           "--dim", str(args.dim), "--repeats", str(repeats)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    record = json.loads(out.strip().splitlines()[-1])
                print(json.dumps(record), flush=True)
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
