"""`clip-pacl demo`: the whole pipeline on the built-in synthetic data, on CPU, in minutes, and its report."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.common import add_device_flag, add_json_flag, print_json

COMMAND = "demo"
ORDER = 0
HELP = ("generate synthetic data, train a tiny CLIP and PACL on it, evaluate zero-shot, retrieval, CLIPScore and "
        "segmentation, and write a report")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from clip_pacl.device import PRECISIONS
    from clip_pacl_app.demo.pipeline import DemoConfig  # torch-free: --help stays fast

    quick = DemoConfig.quick("q")
    p.add_argument("--out", default="demo_out",
                   help="run directory: report.html, report.md, figures/, data, checkpoints, index/, summary.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it already holds an earlier demo's output (nothing else is deleted)")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run with tiny sizes: every phase and the whole report, numbers meaningless")
    p.add_argument("--clip-steps", type=int, default=None,
                   help=f"CLIP training steps (default {DemoConfig.clip_steps}; --quick: {quick.clip_steps})")
    p.add_argument("--pacl-steps", type=int, default=None,
                   help=f"PACL training steps (default {DemoConfig.pacl_steps}; --quick: {quick.pacl_steps})")
    p.add_argument("--seed", type=int, default=0, help="seed for data generation and training")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: one per core; --quick: 1). On a busy machine fewer threads "
                        "finish sooner: threads that must meet after every op wait for each other")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training and evaluation precision: auto (default) is bf16 where the CPU has AMX or AVX-512 "
                        "BF16 (or on a bf16 GPU), else fp32; the summary and the report say which ran")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_flag(p)
    add_json_flag(p)


def run(args: argparse.Namespace) -> int:
    from clip_pacl_app.demo import DemoConfig, format_summary, run_demo

    kw = {"device": args.device, "seed": args.seed, "progress": not args.no_progress, "overwrite": args.overwrite,
          "precision": args.precision}
    if args.threads is not None:
        kw["threads"] = args.threads
    overrides = {k: v for k, v in (("clip_steps", args.clip_steps), ("pacl_steps", args.pacl_steps)) if v is not None}
    if any(v < 1 for v in overrides.values()):
        raise ValueError("--clip-steps and --pacl-steps must be at least 1")
    kw.update(overrides)
    cfg = DemoConfig.quick(args.out, **kw) if args.quick else DemoConfig(out=args.out, **kw)
    summary = run_demo(cfg)
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0
