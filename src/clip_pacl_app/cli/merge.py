"""`clip-pacl merge`: WiSE-FT weight interpolation of a base model and its fine-tuned version."""

from __future__ import annotations

import argparse

from clip_pacl_app.cli.common import add_json_flag, load_model, log, print_json

COMMAND = "merge"
HELP = "interpolate the weights of a base and a fine-tuned model (WiSE-FT)"
DESCRIPTION = (
    "Write (1 - alpha) * BASE + alpha * FINETUNED as a new checkpoint: alpha 0 is the base model, "
    "1 the fine-tuned one; about 0.5 usually keeps most of the fine-tuned accuracy and the base model's "
    "zero-shot robustness. Both must be the same architecture (any format clip_pacl.load reads)."
)
ORDER = 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="the model before fine-tuning (checkpoint dir, weights file, ...)")
    parser.add_argument("finetuned", help="the fine-tuned model, same architecture")
    parser.add_argument("--random-weights", action="store_true",
                        help="accept presets (randomly initialised models, for tests) as BASE or FINETUNED")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model, 0..1")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    import clip_pacl
    from clip_pacl.checkpoint.merge import merge_models

    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 (base) and 1 (fine-tuned), not {args.alpha}")
    base = load_model(args, args.base, flag="BASE", device="cpu")  # a preset (random weights) is refused
    finetuned = load_model(args, args.finetuned, flag="FINETUNED", device="cpu")
    merged = merge_models(base, finetuned, args.alpha, names=(args.base, args.finetuned))
    out = clip_pacl.save(merged, args.out)
    n_tensors = len(merged.state_dict())
    result = {"out": str(out), "alpha": args.alpha, "base": args.base, "finetuned": args.finetuned,
              "tensors": n_tensors}
    if args.json:
        print_json(result)
    else:
        log(f"merged {n_tensors} tensors with alpha={args.alpha}")
        print(out)
    return 0
