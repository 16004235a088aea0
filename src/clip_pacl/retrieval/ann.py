"""Approximate nearest-neighbour search over an image index with faiss: build, save, load, query.

An index directory (`retrieval/store.py`) may hold, beside its exact embeddings, a trained faiss index:

```
IDX/ann.faiss   faiss.write_index of the approximate index; its row i is row i of embeddings.npy
IDX/meta.json   "ann": {"requested": "auto", "factory": "PQ256x4fs", "file": "ann.faiss", "nprobe": null,
                        "ef_search": null, "rerank": 40, "train_size": 65536, "options": {...the build flags...},
                        "faiss_version": "1.15.1", "build_seconds": 31.1}
```

A query asks faiss for `rerank` x k candidates and re-scores them exactly against the stored embeddings, so
scores are always true cosines and lossy codes (PQ) cost only the neighbours they leave out of the candidates.
(faiss's IndexRefineFlat, `...,RFlat`, does the same with a second copy of every vector in the file.)
`nprobe` (IVF) and `ef_search` (HNSW) are saved with the index and can be changed per query.

`auto` follows what `benchmarks/search.py` measured on 512-d random unit vectors, the hardest data for every
ANN structure (no clusters for IVF to exploit, no low intrinsic dimension for HNSW's graph): exact search below
AUTO_MIN_VECTORS embeddings; above, an exhaustive 4-bit PQ fast scan of D/2 two-dimensional sub-vectors
(D/4 bytes a vector: "PQ256x4fs" for 512-d) whose 40 x k best candidates are re-ranked exactly: recall@10 0.986
at 1M, 17 ms a query on one loaded core. On 100k such vectors IVF1024 reached recall@10 0.78 visiting half its
lists, HNSW32 0.75 at efSearch 1024 (README, "Search at scale").

Loading reads faiss's own format with faiss.read_index, nothing pickled.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_pacl.console import human_bytes
from clip_pacl.errors import CheckpointError, DataError, MissingDependencyError

ANN_NAME = "ann.faiss"
AUTO = "auto"
AUTO_MIN_VECTORS = 100_000  # exact below this (query times by size: README "Search at scale", benchmarks/search.py)
AUTO_RERANK = 40  # candidates per result for the auto choice (its recall: README "Search at scale")
MIN_TRAIN_SIZE = 65_536  # what faiss's k-means uses for 256 centroids (8-bit PQ) at most
TRAIN_PER_LIST = 40  # IVF: faiss asks for at least 39 training vectors per list
OPTIONS = ("nprobe", "ef_search", "rerank", "train_size")
# Reading an index file may take FAISS_READ_FACTOR x its length + FAISS_READ_EXTRA of memory (`check_faiss_file`):
# faiss's arrays are the file's bytes (codes, ids, graphs, centroids), plus tables derived from them.
FAISS_READ_FACTOR = 4
FAISS_READ_EXTRA = 256 * 2**20
FAISS_CHECK_TIMEOUT = 600
_OUT_OF_MEMORY, _FAISS_ERROR = 3, 4
# The child of `check_faiss_file`: its heap (VmData) may grow by argv[2] bytes once faiss is imported.
_CHECK_SCRIPT = f"""
import resource, sys
import faiss
try:
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (used + int(sys.argv[2]),) * 2)
except OSError:
    pass  # no /proc (not Linux): the child still keeps a crash out of the caller
try:
    faiss.read_index(sys.argv[1])
except MemoryError:
    sys.exit({_OUT_OF_MEMORY})
except RuntimeError as e:
    print(e)
    sys.exit({_OUT_OF_MEMORY} if "bad_alloc" in str(e) or "alloc" in str(e).lower() else {_FAISS_ERROR})
"""


def import_faiss(feature: str = "approximate search"):
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("faiss-cpu", "faiss", feature) from None
    return faiss


def resolve_factory(requested: str, count: int, dim: int) -> str | None:
    """The faiss factory string `requested` stands for at `count` embeddings of `dim` dimensions; None: exact."""
    requested = requested.strip()
    if not requested:
        raise DataError("the faiss index factory string is empty (e.g. 'PQ256x4fs', 'HNSW32' or 'auto')")
    if requested != AUTO:
        return requested
    if count < AUTO_MIN_VECTORS:
        return None
    return f"PQ{dim // 2 if dim % 2 == 0 else dim}x4fs"


def check_request(requested: str, dim: int, nprobe: int | None = None, ef_search: int | None = None,
                  rerank: int | None = None, train_size: int | None = None) -> None:
    """Fail now, before minutes of embedding, on a factory string faiss cannot build or a setting it lacks."""
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("rerank", rerank), ("train_size", train_size)):
        _check_positive(name, value)
    factory = resolve_factory(requested, 0, dim)
    faiss = import_faiss("--faiss-index")
    if factory is not None:
        index = _call(factory, None, lambda: faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
        AnnIndex(index, {"factory": factory}).check(nprobe, ef_search)


def build_ann(embeddings: torch.Tensor, requested: str, nprobe: int | None = None, ef_search: int | None = None,
              rerank: int | None = None, train_size: int | None = None,
              seed: int = 0) -> tuple[AnnIndex | None, dict[str, Any]]:
    """Train and fill a faiss index over `embeddings` (N, D) from a factory string (or "auto"); returns it (None
    when "auto" chose exact search) and its meta.json record. Training uses a seeded sample of `train_size` rows
    (default: all up to MIN_TRAIN_SIZE, or TRAIN_PER_LIST per IVF list)."""
    options = {"nprobe": nprobe, "ef_search": ef_search, "rerank": rerank, "train_size": train_size}
    for name, value in options.items():
        _check_positive(name, value)
    count, dim = embeddings.shape
    factory = resolve_factory(requested, count, dim)
    info: dict[str, Any] = {"requested": requested.strip(), "factory": factory, "file": None, "options": options}
    if factory is None:
        return None, info
    faiss = import_faiss("--faiss-index")
    start = time.perf_counter()
    index = _call(factory, count, lambda: faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    ann = AnnIndex(index, info)
    info.update(file=ANN_NAME, nprobe=nprobe or (ann.ivf.nprobe if ann.ivf is not None else None),
                ef_search=ef_search or (ann.hnsw.hnsw.efSearch if ann.hnsw is not None else None),
                rerank=rerank or (AUTO_RERANK if requested.strip() == AUTO else 1), faiss_version=faiss.__version__)
    ann.check(nprobe, ef_search)  # a setting that does not apply fails before training
    size = 0
    if not index.is_trained:
        nlist = ann.ivf.nlist if ann.ivf is not None else 0
        size = min(count, train_size or max(MIN_TRAIN_SIZE, TRAIN_PER_LIST * nlist))
        rows = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size].sort().values
        sample = np.ascontiguousarray(embeddings[rows].float().numpy())  # (size, D)
        with _kmeans_warnings_in_one_line():
            _call(factory, count, lambda: index.train(sample))
    _call(factory, count, lambda: index.add(np.ascontiguousarray(embeddings.float().numpy())))
    info["train_size"] = size
    info["build_seconds"] = round(time.perf_counter() - start, 3)
    return ann, info


def rebuild_request(info: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `build_ann` that made the index `info` (meta.json's "ann") describes: what `index update`
    builds again for the updated embeddings ("auto" chooses again for the new count)."""
    return {"requested": info["requested"], **{name: info.get("options", {}).get(name) for name in OPTIONS}}


def load_ann(folder: Path, info: dict[str, Any] | None, count: int, dim: int) -> AnnIndex | None:
    """The approximate index meta.json's "ann" record names, checked against the exact embeddings; None when there
    is none or faiss is not installed (search is then exact)."""
    if info is not None and not isinstance(info, dict):
        raise CheckpointError(f"{folder} is a damaged image index (meta.json's \"ann\" is not an object)")
    if not info or not info.get("file"):
        return None
    path = folder / ANN_NAME
    if info["file"] != ANN_NAME or not path.is_file():
        raise CheckpointError(f"{folder} is a damaged image index (meta.json names an approximate index, "
                              f"{ANN_NAME} is missing)")
    try:
        faiss = import_faiss()
    except MissingDependencyError:
        return None
    check_faiss_file(path)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise CheckpointError(f"{folder} is a damaged image index ({ANN_NAME}: {_faiss_reason(e)})") from None
    if index.d != dim or index.ntotal != count:
        raise CheckpointError(f"{folder} is a damaged image index ({ANN_NAME} holds {index.ntotal} vectors of "
                              f"{index.d} dimensions, embeddings.npy {count} of {dim})")
    bad = _ids_out_of_range(index, count)
    if bad is not None:
        raise CheckpointError(f"{folder} is a damaged image index ({ANN_NAME} {bad}, but the index has {count} rows)")
    return AnnIndex(index, info)


def faiss_read_allowance(file_bytes: int) -> int:
    """The memory faiss may take to read an index file of `file_bytes`: what its data can justify, with room."""
    return FAISS_READ_FACTOR * file_bytes + FAISS_READ_EXTRA


def check_faiss_file(path: Path) -> None:
    """Read `path` with faiss once in a child process whose heap is capped at `faiss_read_allowance` of the file's
    length: faiss allocates each array a file claims (zero-filled) before reading it, so a file that claims more
    than it holds, or that crashes faiss, is refused here instead of costing this process the claim.
    (Parsing faiss's format ourselves would cover only the index types we parse; the child covers every one.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, str(path),
                               str(faiss_read_allowance(path.stat().st_size))],
                              capture_output=True, text=True, env=env, timeout=FAISS_CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"{path} takes faiss over {FAISS_CHECK_TIMEOUT} s to read") from None
    if done.returncode == 0:
        return
    if done.returncode == _OUT_OF_MEMORY:
        why = (f"it claims more memory than its {human_bytes(path.stat().st_size)} can hold (reading it needs over "
               f"{human_bytes(faiss_read_allowance(path.stat().st_size))})")
    elif done.returncode == _FAISS_ERROR:
        why = _faiss_reason(RuntimeError(done.stdout))
    else:
        why = f"faiss crashes reading it (exit {done.returncode})"
    raise CheckpointError(f"{path.parent} is a damaged image index ({ANN_NAME}: {why})")


def _ids_out_of_range(index: Any, count: int) -> str | None:
    """Where the ids an IVF index stores, or the neighbours an HNSW graph links, leave [0, count): faiss would
    return (or visit) rows the index does not have."""
    faiss = import_faiss()
    ivf = _find_ivf(index)
    if ivf is not None:
        lists = faiss.extract_index_ivf(index).invlists
        for i in range(lists.nlist):
            n = lists.list_size(i)
            ids = faiss.rev_swig_ptr(lists.get_ids(i), n) if n else np.empty(0, dtype=np.int64)
            if n and (ids.min() < 0 or ids.max() >= count):
                return f"lists id {int(ids.max() if ids.max() >= count else ids.min())} in inverted list {i}"
    hnsw = _find_hnsw(index)
    if hnsw is not None:
        neighbors = faiss.vector_to_array(hnsw.hnsw.neighbors)
        if len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= hnsw.ntotal):
            return f"links its HNSW graph to node {int(neighbors.max())}"
    return None


class AnnIndex:
    """A trained faiss index whose row i is embedding i of an ImageIndex, with its saved query settings."""

    def __init__(self, index: Any, info: dict[str, Any]):
        self.index = index
        self.info = info
        self.ivf = _find_ivf(index)  # the IVF part, whose nprobe a query sets (None: no inverted lists)
        self.hnsw = _find_hnsw(index)  # the HNSW graph (the index or an IVF's quantizer), whose efSearch a query sets
        self._lock = threading.Lock()  # settings are attributes of the shared faiss index: one query at a time

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def write(self, folder: Path) -> Path:
        path = folder / ANN_NAME
        import_faiss().write_index(self.index, str(path))
        return path

    def check(self, nprobe: int | None, ef_search: int | None, rerank: int | None = None) -> None:
        """Refuse query settings that are not positive or that this index does not have."""
        _check_positive("rerank", rerank)
        for name, value, part, what in (("nprobe", nprobe, self.ivf, "inverted lists"),
                                        ("ef_search", ef_search, self.hnsw, "HNSW graph")):
            _check_positive(name, value)
            if value is not None and part is None:
                raise DataError(f"{name} does not apply to the faiss index '{self.info['factory']}' (it has no "
                                f"{what})")

    def configure(self, nprobe: int | None, ef_search: int | None) -> None:
        """Set the IVF probes and HNSW search depth (None: the saved default)."""
        self.check(nprobe, ef_search)
        if self.ivf is not None:
            self.ivf.nprobe = nprobe or self.info["nprobe"]
        if self.hnsw is not None:
            self.hnsw.hnsw.efSearch = ef_search or self.info["ef_search"]

    def search(self, queries: torch.Tensor, k: int, embeddings: torch.Tensor, nprobe: int | None = None,
               ef_search: int | None = None, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first: the best k of `rerank` x k faiss candidates for each normalised
        query (Q, D), scored exactly against `embeddings` (N, D). Row -1 (score -inf) pads a query that got fewer
        than k candidates (an IVF index with few lists probed).

        The re-ranking is numpy's single-threaded einsum, not torch: torch and faiss each bring their own OpenMP
        runtime, and with 2 threads on the busy 2-core machine a torch gather + einsum after each faiss search
        took 44 ms a query instead of 0.08 (torch's spinning worker threads held the cores faiss's threads
        waited for)."""
        self.check(nprobe, ef_search, rerank)
        candidates = min(self.ntotal, k * (rerank or self.info["rerank"]))
        query_array = np.ascontiguousarray(queries.float().numpy())  # (Q, D)
        with self._lock:
            self.configure(nprobe, ef_search)
            _, rows = self.index.search(query_array, candidates)  # (Q, C)
        vectors = embeddings.detach().float().cpu().numpy()  # (N, D): a view, not a copy
        if rows.size and rows.max() >= len(vectors):  # load_ann checks the stored ids; this keeps any other out
            raise CheckpointError(f"the faiss index returned row {int(rows.max())} of an index of {len(vectors)} rows")
        scores = np.empty(rows.shape, dtype=np.float32)  # (Q, C)
        step = max(1, 2**24 // (candidates * vectors.shape[1]))  # queries per gather of (step, C, D) floats
        for s in range(0, len(rows), step):
            gathered = vectors[np.maximum(rows[s:s + step], 0)]  # (step, C, D)
            scores[s:s + step] = np.einsum("qcd,qd->qc", gathered, query_array[s:s + step])
        scores[rows < 0] = -np.inf
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
        top, top_rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)
        return top, np.where(np.isneginf(top), -1, top_rows)


def _find_ivf(index: Any) -> Any:
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)  # through IndexPreTransform (OPQ, PCA) and IndexRefine
    except RuntimeError:
        return None


def _find_hnsw(index: Any) -> Any:
    faiss = import_faiss()
    part = faiss.downcast_index(index)
    while part is not None and not hasattr(part, "hnsw"):
        inner = next((getattr(part, name) for name in ("index", "base_index", "quantizer") if hasattr(part, name)),
                     None)
        part = faiss.downcast_index(inner) if inner is not None else None
    return part


def _call(factory: str, count: int | None, step: Any) -> Any:
    """Run a faiss step, turning its C++ error (file, line, assertion) into one sentence."""
    try:
        return step()
    except RuntimeError as e:
        reason = _faiss_reason(e)
        if "parse" in reason or "not supported" in reason:
            raise DataError(f"'{factory}' is not a faiss index factory string we can build ({reason}); "
                            f"see https://github.com/facebookresearch/faiss/wiki/The-index-factory") from None
        source = f" from {count} embeddings" if count is not None else ""
        raise DataError(f"cannot build the faiss index '{factory}'{source} ({reason})") from None


def _faiss_reason(error: RuntimeError) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    text = re.sub(r"^Error: ('.*?' failed)(: )?", lambda m: "" if m.group(2) else m.group(1), text)
    return text[:300] or "faiss failed"


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"{name} must be a positive integer, got {value!r}")


@contextlib.contextmanager
def _kmeans_warnings_in_one_line():
    """faiss's k-means writes 'WARNING clustering N points to K centroids: please provide at least M training
    points' to the C stderr for every codebook it trains (each PQ sub-quantizer, again each OPQ round): caught
    while training and said once. Anything else faiss writes passes through."""
    sys.stderr.flush()
    saved = os.dup(2)
    caught = tempfile.TemporaryFile()
    os.dup2(caught.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        caught.seek(0)
        lines = caught.read().decode(errors="replace").splitlines()
        caught.close()
        warned = [line for line in lines if line.startswith("WARNING clustering")]
        for line in lines:
            if line not in warned:
                print(line, file=sys.stderr)
        if warned:
            print(f"note: faiss's k-means warned {len(warned)} times that it had few training points "
                  f"({warned[-1].removeprefix('WARNING ')}); the index works, with codebooks fitted to fewer points "
                  f"than faiss recommends", file=sys.stderr, flush=True)
