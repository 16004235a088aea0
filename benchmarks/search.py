"""Search at scale: exact torch, exact faiss and approximate faiss indexes on random unit vectors.

For each size, N random unit vectors (seeded) become an `ImageIndex`; every method answers the same random unit
queries through `ImageIndex.search` (what `clip-pacl search` runs): one query at a time (latency p50/p99) and in
batches of 64, with recall@k against the exact top k. Build time, the search structure's size and the process's
resident memory are recorded. One JSON line per (size, method, setting) goes to benchmarks/results/search.jsonl
with the machine, torch and faiss versions and thread counts; a table is printed.

Random vectors in 512-d have no clusters and no low-dimensional structure: the worst case for IVF and HNSW,
so recall here is a floor for real CLIP embeddings.

    OMP_NUM_THREADS=2 python benchmarks/search.py                         # 10k, 100k, 1M (a few minutes, ~5 GB)
    OMP_NUM_THREADS=2 python benchmarks/search.py --sizes 100k --ann "HNSW32@ef_search=64,256,1024"
    python benchmarks/search.py --quick                                   # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clip_pacl.errors import ClipPaclError
from clip_pacl.retrieval import ImageIndex
from clip_pacl.retrieval.ann import import_faiss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import with_machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "search.jsonl"


def parse_size(text: str) -> int:
    """10k -> 10_000, 1M -> 1_000_000, 2500 -> 2500."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 10k, 100k, 1M, 2500)") from None


def parse_spec(text: str) -> tuple[str, str | None, list[int | None]]:
    """'FACTORY@name=v1,v2' -> (factory, name, [v1, v2]); 'FACTORY' -> (factory, None, [None])."""
    factory, _, setting = text.partition("@")
    if not setting:
        return factory, None, [None]
    name, _, values = setting.partition("=")
    if name not in ("nprobe", "ef_search", "rerank") or not values:
        raise argparse.ArgumentTypeError(f"'{text}': the setting must be nprobe=, ef_search= or rerank= with values")
    return factory, name, [int(v) for v in values.split(",")]


def unit_vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) float32 rows uniform on the sphere, generated in chunks (no float64 copy)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        chunk = rng.standard_normal((min(65_536, n - start), dim), dtype=np.float32)
        out[start:start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return torch.from_numpy(out)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(index: ImageIndex, queries: torch.Tensor, truth: torch.Tensor, k: int, batch: int, batches: int,
            backend: str, settings: dict[str, int]) -> dict[str, float]:
    """Latency (ms) one query at a time and per batch, and recall@k of the single-query answers."""
    rows = {path: i for i, path in enumerate(index.paths)}
    index.search(queries[:1], k, backend, **settings)  # warm-up (allocations, lazy structures)
    single, found = [], 0
    for q in range(len(queries)):
        start = time.perf_counter()
        hits = index.search(queries[q:q + 1], k, backend, **settings)[0]
        single.append(time.perf_counter() - start)
        found += len({rows[h.path] for h in hits} & set(truth[q].tolist()))
    batched = []
    for b in range(batches):
        chunk = queries[(b * batch) % len(queries):][:batch]
        chunk = torch.cat([chunk, queries[:batch - len(chunk)]]) if len(chunk) < batch else chunk
        start = time.perf_counter()
        index.search(chunk, k, backend, **settings)
        batched.append(time.perf_counter() - start)
    ms = 1e3 * np.array(single)
    ms_batch = 1e3 * np.array(batched)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "batch_p50_ms": round(float(np.percentile(ms_batch, 50)), 2),
            "batch_p99_ms": round(float(np.percentile(ms_batch, 99)), 2),
            "batch_per_query_ms": round(float(np.percentile(ms_batch, 50)) / batch, 3),
            f"recall@{k}": round(found / (k * len(queries)), 4)}


def build(index: ImageIndex, method: str) -> tuple[float, int, dict]:
    """Prepare `method` on `index`: (seconds, bytes of the search structure, meta of the faiss index if any)."""
    faiss = import_faiss("benchmarks/search.py")
    start = time.perf_counter()
    if method == "torch":
        return 0.0, index.embeddings.numel() * 4, {}
    if method == "faiss-flat":
        index.backend("faiss")  # IndexFlatIP over a copy of the embeddings, built once and kept
        return time.perf_counter() - start, index.embeddings.numel() * 4, {}
    index.build_ann(method)
    if index.ann is None:
        return time.perf_counter() - start, 0, index.meta["ann"]
    return time.perf_counter() - start, int(faiss.serialize_index(index.ann.index).nbytes), index.meta["ann"]


def machine() -> dict:
    """What this benchmark records beyond `machine.machine_info` (which `with_machine` adds to every row: CPU,
    flags, cores, load, torch): memory, faiss and the thread settings."""
    faiss = import_faiss("benchmarks/search.py")
    return {"memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "faiss": faiss.__version__,
            "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "python": platform.python_version()}


def run_size(n: int, args: argparse.Namespace, env: dict, out) -> list[dict]:
    embeddings = unit_vectors(n, args.dim, seed=0)  # (N, D)
    queries = unit_vectors(args.queries, args.dim, seed=1)  # (Q, D)
    truth = (queries @ embeddings.T).topk(args.k, dim=1).indices  # (Q, k): the exact answers
    specs = [("torch", None, [None]), ("faiss-flat", None, [None]), *args.ann]
    records = []
    for method, name, values in specs:
        index = ImageIndex(embeddings, [str(i) for i in range(n)])
        seconds, size, ann = build(index, method)
        if method not in ("torch", "faiss-flat") and index.ann is None:
            print(f"{n}: '{method}' chose exact search (nothing to measure)", file=sys.stderr)
            continue
        backend = {"torch": "torch", "faiss-flat": "faiss"}.get(method, "ann")
        for value in values:
            settings = {name: value} if name else {}
            record = {"benchmark": "search", "size": n, "dim": args.dim, "k": args.k, "queries": args.queries,
                      "batch": args.batch, "method": method, "factory": ann.get("factory"),
                      "setting": f"{name}={value}" if name else "", "build_s": round(seconds, 2),
                      "index_mb": round(size / 2**20, 2), "train_size": ann.get("train_size"),
                      **measure(index, queries, truth, args.k, args.batch, args.batches,
                                backend, settings),
                      "rss_mb": round(rss_mb()), "load_avg_1m": round(os.getloadavg()[0], 2), **env,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            records.append(record)
            print(json.dumps(record), file=sys.stderr, flush=True)
            out.write(json.dumps(with_machine(record)) + "\n")
            out.flush()
        del index
    return records


def print_table(records: list[dict], k: int) -> None:
    print(f"| size | method | setting | build s | index MB | 1 query p50 ms | p99 ms | batch ms/query | recall@{k} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['size']:,} | {r['factory'] or r['method']} | {r['setting']} | {r['build_s']} | {r['index_mb']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['batch_per_query_ms']} | {r[f'recall@{k}']:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                        help="collection sizes (default: 10k 100k 1M; --quick: 2000)")
    parser.add_argument("--dim", type=int, default=None, help="embedding dimension (default 512; --quick: 64)")
    parser.add_argument("--ann", nargs="+", default=None, metavar="FACTORY[@SETTING=V,V]",
                        help="approximate indexes to build, each measured at every value of one query setting "
                             "(default: PQ<D/2>x4fs, what --faiss-index auto builds, at rerank=10,20,40)")
    parser.add_argument("--queries", type=int, default=None, help="single queries timed (default 100; --quick: 20)")
    parser.add_argument("--batch", type=int, default=64, help="queries per batched call")
    parser.add_argument("--batches", type=int, default=None, help="batched calls timed (default 5; --quick: 2)")
    parser.add_argument("-k", type=int, default=10, help="results per query (recall@k)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSONL file to append to")
    args = parser.parse_args()
    args.sizes = args.sizes or ([2000] if args.quick else [10_000, 100_000, 1_000_000])
    args.dim = args.dim or (64 if args.quick else 512)
    args.queries = args.queries or (20 if args.quick else 100)
    args.batches = args.batches or (2 if args.quick else 5)
    args.ann = args.ann or ([f"PQ{args.dim // 2}x4fs@rerank=4,40", "IVF16,Flat@nprobe=1,16", "HNSW16@ef_search=64"]
                            if args.quick else [f"PQ{args.dim // 2}x4fs@rerank=10,20,40"])
    try:
        args.ann = [parse_spec(spec) for spec in args.ann]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    try:
        env = machine()
        with open(args.out, "a") as out:
            for n in args.sizes:
                records += run_size(n, args, {**env, "quick": args.quick}, out)
    except ClipPaclError as e:  # faiss missing, a factory string faiss cannot build: one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_table(records, args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
