"""The float32 CPU linear kernels side by side on a model's own shapes: the rule behind `models/layers.py::dense`.

For each linear layer of a transformer block of the model's image and text towers (qkv, out, fc1, fc2 at the rows
a batch gives: image batch x tokens; text batch x --text-tokens, the trimmed length of COCO-like captions), four
kernels compute the same product and bias:

- `mkl`: `F.linear`, the BLAS sgemm PyTorch was built with (what open_clip runs);
- `onednn`: `clip_pacl.models.layers.dense`, oneDNN's `_linear_pointwise` on the plain weight (what clip-pacl runs);
- `onednn_packed`: the same with the weight reordered once into oneDNN's blocked layout (`_reorder_linear_weight`);
- `mkl_packed`: MKL's packed sgemm (`torch.ops.mkl._mkl_linear`), where PyTorch has it.

Calls rotate between the kernels (interleaved rounds, after warm-up); each gets the median wall and process CPU
seconds per call, GFLOP/s by both, and its CPU time relative to `mkl`. A block row sums the four layers. The
outputs are compared with `mkl`'s in the same run. Run it on a CPU kind before trusting the rule there:

    python benchmarks/linear_kernels.py --model ViT-B-32 --batch 16 --threads 1 --repeats 15

Appends one JSON object per (tower, layer, kernel) to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from clip_pacl.config import CLIPConfig
from clip_pacl.models.layers import dense

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402


def block_shapes(name: str, batch: int, text_tokens: int) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    """{tower: (rows, {layer: (in, out)})} of one transformer block of each tower (a ResNet has no image block)."""
    config = CLIPConfig.from_name(name)
    towers = {"text": (config.text.width, config.text.mlp_ratio, batch * text_tokens)}
    if not config.vision.is_resnet:
        towers["image"] = (config.vision.width, config.vision.mlp_ratio, batch * (config.vision.grid_size**2 + 1))
    shapes = {}
    for tower, (width, ratio, rows) in towers.items():
        hidden = int(width * ratio)
        shapes[tower] = (rows, {"qkv": (width, 3 * width), "out": (width, width), "fc1": (width, hidden),
                                "fc2": (hidden, width)})
    return shapes


def kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """{kernel: a function computing F.linear(x, weight, bias)}, each weight layout prepared once."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    fns = {"mkl": lambda: F.linear(x, weight, bias), "onednn": lambda: dense(x, weight, bias),
           "onednn_packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")}
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, x.shape[0])
        fns["mkl_packed"] = lambda: torch.ops.mkl._mkl_linear(x, mkl_packed, weight, bias, x.shape[0])
    return fns


def time_rotating(fns: dict, repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """{key: (median wall seconds, median CPU seconds)} per call, calls rotating between the functions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    keys = list(fns)
    wall: dict = {k: [] for k in keys}
    cpu: dict = {k: [] for k in keys}
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[key]()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in keys}


def measure(name: str, batch: int, text_tokens: int, repeats: int, warmup: int) -> list[dict]:
    """One record per (tower, layer, kernel), and per (tower, kernel) a `block` record summing the four layers."""
    records = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for tower, (rows, layers) in block_shapes(name, batch, text_tokens).items():
            fns, flops, diffs = {}, {}, {}
            for layer, (n_in, n_out) in layers.items():
                x = torch.randn(rows, n_in, generator=generator)
                weight, bias = torch.randn(n_out, n_in, generator=generator) * n_in**-0.5, torch.randn(n_out)
                reference = F.linear(x, weight, bias)
                for kernel, fn in kernels(x, weight, bias).items():
                    fns[layer, kernel] = fn
                    flops[layer, kernel] = 2 * rows * n_in * n_out
                    diffs[layer, kernel] = float((fn() - reference).abs().max())
            seconds = time_rotating(fns, repeats, warmup)
            for kernel in sorted({k for _, k in fns}):
                block = [(layer, kernel) for layer in layers if (layer, kernel) in fns]
                seconds[("block", kernel)] = tuple(sum(seconds[key][i] for key in block) for i in (0, 1))
                flops[("block", kernel)] = sum(flops[key] for key in block)
                diffs[("block", kernel)] = max(diffs[key] for key in block)
            for (layer, kernel), (wall, cpu) in seconds.items():
                records.append({"model": name, "tower": tower, "rows": rows, "layer": layer, "kernel": kernel,
                                "wall_ms": round(1e3 * wall, 3), "cpu_ms": round(1e3 * cpu, 3),
                                "gflop_s": round(flops[layer, kernel] / wall / 1e9, 1),
                                "gflop_per_cpu_s": round(flops[layer, kernel] / cpu / 1e9, 1),
                                "cpu_vs_mkl": round(seconds[layer, "mkl"][1] / cpu, 3),
                                "max_abs_diff_vs_mkl": diffs[layer, kernel]})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="a preset: its towers' widths give the shapes")
    parser.add_argument("--batch", type=int, default=16, help="images (and texts) per call")
    parser.add_argument("--text-tokens", type=int, default=22,
                        help="text positions per caption after trimming (22: encode.py's COCO-like captions)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per kernel and layer (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "linear_kernels.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    common = {**machine_info("cpu"), "batch": args.batch, "repeats": args.repeats,
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    records = [{**r, **common} for r in measure(args.model, args.batch, args.text_tokens, args.repeats, args.warmup)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"{'tower':<6} {'rows':>5} {'layer':<6} {'kernel':<14} {'wall ms':>8} {'cpu ms':>8} {'GFLOP/s':>8} "
          f"{'GF/cpu-s':>8} {'cpu vs mkl':>10} {'max diff':>9}")
    for r in records:
        print(f"{r['tower']:<6} {r['rows']:>5} {r['layer']:<6} {r['kernel']:<14} {r['wall_ms']:>8} {r['cpu_ms']:>8} "
              f"{r['gflop_s']:>8} {r['gflop_per_cpu_s']:>8} {r['cpu_vs_mkl']:>10} {r['max_abs_diff_vs_mkl']:>9.1e}")
    print(f"load {common['load_avg_1m']}, {common['cpu']} ({', '.join(common['cpu_flags'])}), {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
