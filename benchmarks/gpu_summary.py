"""The GPU targets of issue #13 against what one run of benchmarks/gpu.sh measured, as one table.

Reads the JSONL files that run wrote (train_step, encode, pacl_loss; any may be missing when its step failed) and
prints, per measurement, clip-pacl's rate, open_clip's, their ratio and the issue's goal for it:

- training samples/s with bf16 autocast and torch.compile: >= 1.3x open_clip compiled (MFU of each against the
  measured matmul peak beside it);
- encoding at batch 1024, float32 eager: >= 1.5x open_clip eager;
- the PACL loss: time and peak memory of the materialised version over the exact one (no goal: a measurement).

The goals are GPU goals; on CPU (a smoke run) the table is printed the same way and "met" means nothing.

    python benchmarks/gpu_summary.py --train RUN/gpu_train_step.jsonl --encode RUN/gpu_encode.jsonl \
        --pacl RUN/gpu_pacl_loss.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_GOAL, ENCODE_GOAL = 1.3, 1.5


def read(path: Path | None) -> list[dict]:
    """The records of a JSONL file; none when it is not given or was not written."""
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(records: list[dict]) -> list[list[str]]:
    steps = {}
    for r in records:
        if r.get("mode") == "step":
            steps.setdefault((r["preset"], r["batch_size"], r["image_size"]), {})[r["library"]] = r
    rows = []
    for (preset, batch, size), pair in steps.items():
        ours, theirs = pair.get("clip_pacl"), pair.get("open_clip")
        if not (ours and theirs):
            continue
        settings = f"amp {ours['amp']}, compile {ours['compile'] or 'off'}"
        rows.append([f"train {preset} b{batch} {size}px ({settings})", f"{ours['samples_per_s']} samples/s",
                     f"{theirs['samples_per_s']} samples/s", f"{ours['speedup_vs_open_clip']:.2f}x",
                     f">= {TRAIN_GOAL}x", _met(ours["speedup_vs_open_clip"], TRAIN_GOAL),
                     f"MFU {ours['mfu_pct']}% / {theirs['mfu_pct']}% of {ours['peak_gflop_s']:.0f} GFLOP/s "
                     f"{ours['peak_dtype']}"])
    return rows


def encode_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        if r.get("kind") == "peak_rss":
            continue
        note = f"max abs diff {r['max_abs_diff']:.1e}"
        if "ours_gflop_s" in r:
            note += f", {r['ours_gflop_s']:.0f} GFLOP/s"
        rows.append([f"encode {r['model']} {r['tower']} b{r['batch']} (amp {r['amp']})", f"{r['ours_per_s']}/s",
                     f"{r['open_clip_per_s']}/s", f"{r['ratio']:.2f}x", f">= {ENCODE_GOAL}x",
                     _met(r["ratio"], ENCODE_GOAL), note])
    return rows


def pacl_rows(records: list[dict]) -> list[list[str]]:
    by_size = {}
    for r in records:
        if "skipped" not in r:
            by_size.setdefault((r["batch"], r["patches"], r["dim"]), {})[r["impl"]] = r
    rows = []
    for (batch, patches, dim), impls in by_size.items():
        exact, naive = impls.get("exact"), impls.get("materialised")
        if not (exact and naive):
            continue
        memory = "CUDA" if exact["memory"] == "cuda_max_allocated" else "RSS"
        rows.append([f"PACL loss B={batch} N={patches} D={dim} (fwd+bwd)",
                     f"{1000 * exact['seconds_fwd_bwd']:.2f} ms, {exact['peak_extra_mib']:.0f} MiB",
                     f"materialised {1000 * naive['seconds_fwd_bwd']:.2f} ms, {naive['peak_extra_mib']:.0f} MiB",
                     f"{naive['seconds_fwd_bwd'] / exact['seconds_fwd_bwd']:.2f}x time", "", "",
                     f"peak {memory} memory {naive['peak_extra_mib'] / max(exact['peak_extra_mib'], 1e-9):.2f}x"])
    return rows


def _met(ratio: float, goal: float) -> str:
    return "yes" if ratio >= goal else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, help="train_step.py's JSONL of this run")
    parser.add_argument("--encode", type=Path, help="encode.py's JSONL of this run")
    parser.add_argument("--pacl", type=Path, help="pacl_loss.py's JSONL of this run")
    args = parser.parse_args()
    train, encode, pacl = read(args.train), read(args.encode), read(args.pacl)
    rows = train_rows(train) + encode_rows(encode) + pacl_rows(pacl)
    device = next((r.get("gpu") or r.get("cpu") for r in train + encode + pacl), "no measurements")
    print(f"\nissue #13 targets on {device}")
    header = ["measurement", "clip-pacl", "open_clip / reference", "ratio", "goal", "met", "notes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
