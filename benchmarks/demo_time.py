"""How long `clip-pacl demo` takes, phase by phase, and what it measured: the command a user runs, timed whole.

Runs `python -m clip_pacl_app.cli.main demo --json` in a fresh temporary folder with OMP_NUM_THREADS set, so the wall
time includes the interpreter's start and every import, as `time clip-pacl demo` would. The per-phase wall and CPU
seconds come from the demo's own summary. The load average before and after says how much other jobs shared the
machine (on a 2-core machine, anything above 2 means the timings are inflated).

    python benchmarks/demo_time.py --threads 2              # the default demo (the README's number)
    python benchmarks/demo_time.py --threads 2 --quick      # the smoke run

Appends one JSON object per run to benchmarks/results/demo_time.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_jsonl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "demo_time.jsonl"


def metrics(s: dict) -> dict:
    """The headline numbers of a demo summary."""
    colour = s["segmentation"]["segmentation_colors"]
    return {"shape_top1": s["zeroshot"]["shapes"]["top1"], "colour_top1": s["zeroshot"]["colors"]["top1"],
            "t2i_R@1": s["retrieval"]["text_to_image_R@1"], "i2t_R@1": s["retrieval"]["image_to_text_R@1"],
            "clip_score_matched": s["clip_score"]["matched"], "clip_score_mismatched": s["clip_score"]["mismatched"],
            "clip_loss": s["clip_train"]["final_loss"], "pacl_loss": s["pacl_train"]["final_loss"],
            **{f"miou_colour_{m}": colour[m]["best"]["miou"] for m in ("patch", "maskclip", "pacl")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="time `demo --quick` instead of the default demo")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the demo")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSONL file to append the result to")
    parser.add_argument("--label", default="", help="a note stored with the result (commit, machine state)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="run the demo into DIR (new or empty) and keep it, report included")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="demo_time_") as tmp:
        command = [sys.executable, "-m", "clip_pacl_app", "demo", "--out", str(args.keep or Path(tmp) / "demo"),
                   "--no-progress", "--json", *(["--quick"] if args.quick else [])]
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: the demo failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout)
    import torch

    record = {"mode": "quick" if args.quick else "default", "wall_s": round(wall, 1), "demo_s": summary["seconds"],
              "phases": summary["phases"], "clip_steps": summary["clip_train"]["steps"],
              "pacl_steps": summary["pacl_train"]["steps"], "metrics": metrics(summary), "threads": args.threads,
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
              "torch": torch.__version__, "machine": platform.machine(), "label": args.label,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    append_jsonl(args.out, [record])
    print(f"{'phase':<14}{'wall s':>9}{'CPU s':>9}")
    for name, t in summary["phases"].items():
        print(f"{name:<14}{t['seconds']:>9.1f}{t['cpu_seconds']:>9.1f}")
    print(f"{'total':<14}{wall:>9.1f}   (`demo {'--quick' if args.quick else ''}` as run, start-up included; "
          f"load average {load_before[0]:.1f} before, {record['loadavg_after'][0]:.1f} after, {os.cpu_count()} CPUs)")
    print(" ".join(f"{k} {v:.3f}" for k, v in record["metrics"].items()))


if __name__ == "__main__":
    main()
