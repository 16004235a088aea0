"""Sharded index build and prefix-filtered search, measured.

1. `torchrun --nproc-per-node P -m clip_pacl_app index build` on N synthetic images for each P (P = 1 is the plain
   single-process build under the same launcher), wall time of the whole command (launch, model load, listing,
   embedding, merge, save), and the largest difference of its embeddings from P = 1's (the merged index must be
   the same index). Each process gets `--threads` torch threads, so P processes use P x threads cores.
2. Exact search of a random (R, D) index: the whole index vs. the images under a prefix that matches a given
   fraction of it (the filter gathers the matching rows, then searches them exactly).

Appends one JSON line per setting to benchmarks/results/index_sharded.jsonl and prints a table.

    python benchmarks/index_sharded.py --n 512 --procs 1 2 --rows 200000 --fractions 0.01 0.1 0.5
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.retrieval import ImageIndex
from clip_pacl.retrieval.filters import search_prefix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402


def _record(**fields) -> dict:
    return {**fields, "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def build_runs(args: argparse.Namespace, tmp: Path) -> list[dict]:
    generate_synthetic(tmp / "data", args.n, seed=0, image_size=args.source_size)
    torch.manual_seed(0)
    # one checkpoint: every rank holds the same weights (a preset here is asked for on purpose)
    clip_pacl.save(clip_pacl.load(args.model, random_weights=True), tmp / "model")
    rows, reference = [], None
    for procs in args.procs:
        out = tmp / f"idx-{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "clip_pacl_app", "index", "build", "--model", str(tmp / "model"), "--images",
               str(tmp / "data" / "images"), "--out", str(out), "--batch-size", str(args.batch_size), "--device", "cpu"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"error: the build with {procs} processes failed:\n{proc.stderr[-2000:]}")
        embeddings = np.load(out / "embeddings.npy")
        reference = embeddings if reference is None else reference
        rows.append(_record(benchmark="index_sharded_build", processes=procs, threads_per_process=args.threads,
                            images=args.n, model=args.model, batch_size=args.batch_size, seconds=round(seconds, 2),
                            images_per_s=round(args.n / seconds, 1),
                            max_abs_diff_vs_first=float(np.abs(embeddings - reference).max())))
    return rows


def search_runs(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(args.rows, args.dim, generator=g), dim=-1)  # (R, D)
    queries = torch.randn(args.queries, args.dim, generator=g)
    draw = torch.rand(args.rows, generator=g).tolist()  # the prefix matches rows scattered through the index
    rows = []
    for fraction in [None, *args.fractions]:
        paths = [f"/{'in' if fraction is None or u < fraction else 'out'}/{i:08d}.jpg" for i, u in enumerate(draw)]
        index = ImageIndex(embeddings, paths)

        def run(index=index, fraction=fraction):
            if fraction is None:
                return index.search(queries, args.k, backend="torch")
            return search_prefix(index, queries, args.k, "/in/")

        run()  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            run()
        ms = (time.perf_counter() - start) / args.repeats * 1000
        rows.append(_record(benchmark="index_prefix_search", rows=args.rows, dim=args.dim, queries=args.queries,
                            k=args.k, prefix_fraction="none" if fraction is None else fraction,
                            matched=sum(p.startswith("/in/") for p in paths), threads=args.threads,
                            ms_per_batch=round(ms, 2)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="synthetic images to index")
    parser.add_argument("--source-size", type=int, default=128, help="side of the synthetic PNGs")
    parser.add_argument("--model", default="tiny", help="preset to index with (saved once, shared by the ranks)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to launch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the random index for the search part")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 0.5],
                        help="share of the index the prefix matches (0 < f <= 1)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-build", action="store_true", help="only the search part")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_sharded.jsonl"))
    args = parser.parse_args()

    rows = []
    if not args.skip_build:
        with tempfile.TemporaryDirectory() as tmp:
            rows += build_runs(args, Path(tmp))
    rows += search_runs(args)
    append_jsonl(args.out, rows)
    print(f"{'build: processes':<24}{'seconds':>9}{'images/s':>10}{'max |diff|':>12}")
    for r in (r for r in rows if r["benchmark"] == "index_sharded_build"):
        print(f"{r['processes']:<24}{r['seconds']:>9}{r['images_per_s']:>10}{r['max_abs_diff_vs_first']:>12.1e}")
    print(f"\n{'search: prefix share':<24}{'matched':>9}{'ms/batch':>10}")
    for r in (r for r in rows if r["benchmark"] == "index_prefix_search"):
        print(f"{r['prefix_fraction']:<24}{r['matched']:>9}{r['ms_per_batch']:>10}")
    print(f"\n(appended to {args.out}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
