"""PACL loss: our exact all-pairs formula against the naive ones, time and peak memory, forward + backward.

    python benchmarks/pacl_loss.py [--batch 64 128 256 512] [--patches 49] [--dim 512] [--out FILE]
    python benchmarks/pacl_loss.py --device cuda --batch 256 --patches 196 --impls exact materialised

Implementations (all give the same loss and gradients, see tests/test_pacl.py):
  exact         clip_pacl.losses.pacl.pacl_loss: <p, t> = sum_i a_i s_i, |p|^2 = a^T G a; largest tensor (B, B, N)
  materialised  the direct vectorisation: pool p for every pair as a (B, B, D) tensor, then the cosine
  loop          one (image, text) pair at a time in Python (run only up to --loop-max-batch: it is O(B^2)
                Python calls; bigger batches are reported as skipped, not estimated)
Each measurement runs in a fresh subprocess: one untimed call, then the fastest of --repeats. On CPU, peak memory
is the growth of the process's peak RSS (ru_maxrss) over its level once the inputs exist, so it counts every
allocation of forward and backward; on CUDA (--device cuda) it is torch.cuda.max_memory_allocated over the memory
allocated once the inputs exist, and the timer is read after torch.cuda.synchronize.
Results go to benchmarks/results/pacl_loss.jsonl, one JSON object per (implementation, batch), with the machine,
torch version and threads; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import device_or_exit, machine_info, peak_memory_mib, reset_peak_memory, synchronize  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pacl_loss.jsonl"


def materialised_loss(patch_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    s = torch.einsum("bnd,cd->bcn", patch_emb, text_emb)  # (B, B, N)
    a = s.softmax(dim=-1)
    pooled = torch.einsum("bcn,bnd->bcd", a, patch_emb)  # (B, B, D): the tensor the exact formula avoids
    logits = logit_scale * F.cosine_similarity(pooled, text_emb[None], dim=-1)  # (B, B); the scale, not its log
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def loop_loss(patch_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    rows = []
    for v in patch_emb:
        row = []
        for t in text_emb:
            a = (v @ t).softmax(dim=0)
            row.append(F.cosine_similarity(a @ v, t, dim=0))
        rows.append(torch.stack(row))
    logits = logit_scale * torch.stack(rows)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def worker(impl: str, batch: int, patches: int, dim: int, repeats: int, device: torch.device) -> dict:
    from clip_pacl.losses.pacl import pacl_loss

    fn = {"exact": pacl_loss, "materialised": materialised_loss, "loop": loop_loss}[impl]
    torch.manual_seed(0)
    patch_emb = F.normalize(torch.randn(batch, patches, dim, device=device), dim=-1).requires_grad_()  # (B, N, D)
    text_emb = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_()  # (B, D)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)  # the scale, as the losses take it
    synchronize(device)
    reset_peak_memory(device)
    base = peak_memory_mib(device)  # CUDA: what the inputs hold; CPU: the peak RSS so far
    times = []
    for _ in range(repeats + 1):  # the first call warms up (kernels, allocator) and is not timed
        synchronize(device)
        start = time.perf_counter()
        loss = fn(patch_emb, text_emb, scale)
        loss.backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
        patch_emb.grad = text_emb.grad = scale.grad = None
    return {"impl": impl, "batch": batch, "patches": patches, "dim": dim, "loss": loss.item(),
            "seconds_fwd_bwd": min(times[1:]), "peak_extra_mib": round(peak_memory_mib(device) - base, 2),
            "memory": "cuda_max_allocated" if device.type == "cuda" else "peak_rss", **machine_info(device)}


def print_table(records: list[dict]) -> None:
    """One row per measurement, with time and memory relative to the exact formula at the same size."""
    exact = {(r["batch"], r["patches"], r["dim"]): r for r in records if r["impl"] == "exact" and "skipped" not in r}
    print(f"{'impl':<13} {'B':>5} {'N':>4} {'D':>5} {'fwd+bwd ms':>11} {'peak MiB':>9} {'time/exact':>10} "
          f"{'mem/exact':>9}")
    for r in records:
        if "skipped" in r:
            print(f"{r['impl']:<13} {r['batch']:>5} {r['patches']:>4} {r['dim']:>5} skipped: {r['skipped']}")
            continue
        ref = exact.get((r["batch"], r["patches"], r["dim"]))
        time_ratio = f"{r['seconds_fwd_bwd'] / ref['seconds_fwd_bwd']:.2f}x" if ref else ""
        mem_ratio = f"{r['peak_extra_mib'] / ref['peak_extra_mib']:.2f}x" if ref and ref["peak_extra_mib"] > 0 else ""
        print(f"{r['impl']:<13} {r['batch']:>5} {r['patches']:>4} {r['dim']:>5} {1000 * r['seconds_fwd_bwd']:>11.2f} "
              f"{r['peak_extra_mib']:>9.1f} {time_ratio:>10} {mem_ratio:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--patches", type=int, default=49, help="patches per image (ViT-B/32 at 224 px: 49)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-max-batch", type=int, default=64)
    parser.add_argument("--impls", nargs="+", default=["exact", "materialised", "loop"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = device_or_exit(args.device)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.patches, args.dim, args.repeats, device)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with open(args.out, "a") as f:
        for batch in args.batch:
            for impl in args.impls:
                if impl == "loop" and batch > args.loop_max_batch:
                    record = {"impl": impl, "batch": batch, "patches": args.patches, "dim": args.dim,
                              "skipped": f"batch > --loop-max-batch {args.loop_max_batch}"}
                else:
                    repeats = 1 if impl == "loop" else args.repeats
                    cmd = [sys.executable, __file__, "--worker", impl, str(batch), "--patches", str(args.patches),
                           "--dim", str(args.dim), "--repeats", str(repeats), "--device", args.device]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.exit(f"error: {impl} at batch {batch} failed:\n{proc.stderr[-2000:]}")
                    record = json.loads(proc.stdout.strip().splitlines()[-1])
                record["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                print(json.dumps(record), flush=True)
                f.write(json.dumps(record) + "\n")
                records.append(record)
    print_table(records)


if __name__ == "__main__":
    main()
