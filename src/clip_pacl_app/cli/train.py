"""`clip-pacl train`: parse flags (and --config JSON), build a TrainConfig, call clip_pacl.train.train."""

from __future__ import annotations

import argparse
from typing import Any

from clip_pacl.errors import ConfigError
from clip_pacl_app.cli.common import add_json_flag, fold_pretrained, log, print_json

COMMAND = "train"
HELP = "train a CLIP (or SigLIP / PACL) model on image-caption data"
DESCRIPTION = (
    "Train on CSV/TSV/JSONL image-caption data. Writes OUT/checkpoints/step_N (resumable), OUT/final (the model, "
    "for clip_pacl.load and the eval commands), OUT/metrics.jsonl, OUT/loss.png and TensorBoard logs. Run several "
    "processes with `torchrun --nproc-per-node N -m clip_pacl_app train ARGS`. Flag values can also come from "
    "--config FILE (a JSON object of flag names to values); flags on the command line win."
)
ORDER = 10


def _default(name: str) -> Any:
    """The value a flag left out gets: TrainConfig's default, or PACLConfig's for a --pacl-* flag."""
    from clip_pacl.train.config import pacl_defaults, train_defaults

    return {**train_defaults(), **pacl_defaults()}[name]


def _flag_adder(group: Any):
    """`arg(*names, help=..., **kw)` adding a flag to `group`. Every flag defaults to "absent" so that --config
    values apply unless the flag is given; the real defaults are TrainConfig's and are shown in the help."""

    def arg(*names: str, help: str, **kw: Any) -> None:
        dest = kw.pop("dest", names[0].lstrip("-").replace("-", "_"))
        default = _default(dest)
        shown = f" (default: {default})" if default is not None and default is not False else ""
        group.add_argument(*names, dest=dest, default=argparse.SUPPRESS, help=help + shown, **kw)

    return arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    arg = _flag_adder(p.add_argument_group("data"))
    arg("--data", help="training data: CSV/TSV/JSONL of image,caption rows, or a directory holding one",
        metavar="FILE|DIR")
    arg("--data-format", help="csv, tsv or jsonl when the file extension does not say", metavar="F")
    arg("--image-key", help="column holding image paths", metavar="K")
    arg("--caption-key", help="column holding captions", metavar="K")
    arg("--images", dest="images_dir", metavar="DIR",
        help="image folder for COCO captions JSON or Flickr captions, when it is not beside the annotations")
    arg("--val-data", help="held-out image,caption file for validation recall@1", metavar="FILE")
    arg("--val-fraction", type=float, help="hold out this fraction of the training images for validation",
        metavar="F")
    arg("--workers", type=int, metavar="N",
        help="data loading processes decoding images beside the training step; 0: in the main process "
             "(default: one per CPU less one, at most 4, no more than an epoch's batches)")
    arg("--max-bad-fraction", type=float, help="stop when more than this fraction of images cannot be read",
        metavar="F")
    group = p.add_argument_group("model and objective")
    arg = _flag_adder(group)
    arg("--model", help="preset name (tiny, ViT-B-32, ...: training from scratch), a preset with pretrained weights "
                        "(ViT-B-32:openai, as open_clip names them: fine-tuning), open_clip model-config JSON, or "
                        "checkpoint dir", metavar="PRESET|PRESET:TAG|JSON|CKPT")
    group.add_argument(
        "--pretrained", default=argparse.SUPPRESS, metavar="TAG|FILE",
        help="pretrained weights for a preset --model (--model ViT-B-32 --pretrained openai is --model "
             "ViT-B-32:openai)")
    arg("--objective", choices=_objectives(),
        help="loss: CLIP InfoNCE, SigLIP sigmoid, or PACL (default: the model's own: clip, or pacl for a PACL "
             "checkpoint)")
    arg("--image-size", type=int, help="training resolution (default: the model's)", metavar="N")
    arg("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    arg("--lock-image-unlocked-groups", type=int, metavar="N",
        help="with --lock-image, keep the last N layer groups trainable (ViT: blocks, the last with ln_post/proj; "
             "ResNet: stages, the last with attnpool)")
    arg("--lock-text", action="store_true", help="freeze the text tower")
    arg = _flag_adder(p.add_argument_group(
        "PACL", "A new PACL (--objective pacl on a CLIP) takes the default of a --pacl-* flag left out; a PACL "
                "checkpoint keeps its own value unless the flag is given."))
    arg("--cache-features", action="store_true",
        help="PACL: encode every image and caption with the frozen CLIP once, then train only the embedders "
             "(no image augmentation)")
    arg("--pacl-unfreeze-blocks", type=int, metavar="N",
        help="PACL: also train the last N image-tower blocks (ViT blocks / ResNet stages); 0 keeps the CLIP frozen")
    arg("--pacl-pool-temperature", type=float, metavar="F",
        help="PACL: pooling softmax temperature, a = softmax(s / F); lower selects patches; 0.05 "
             "with maskclip tokens segments best (README); the paper's setting is 1.0 with tokens")
    arg("--pacl-patch-tokens", choices=["tokens", "maskclip"],
        help="PACL: CLIP patch tokens fed to the vision embedder: last block outputs (the paper's, for large "
             "pretrained CLIPs) or MaskCLIP's value path (the default), which keeps each token local when the last "
             "block's attention mixes every patch with the whole image")
    _add_optimisation_flags(_flag_adder(p.add_argument_group("optimisation")))
    arg = _flag_adder(p.add_argument_group("output"))
    arg("--out", help="run directory", metavar="DIR")
    arg("--resume", help="'auto' (newest checkpoint in --out, if any) or a checkpoint / run directory",
        metavar="auto|DIR")
    arg("--save-every", type=int, help="checkpoint every N steps (always at the end)", metavar="N")
    arg("--keep", type=int, help="keep the newest K checkpoints", metavar="K")
    arg("--val-every", type=int, help="validation recall@1 every N steps (always at the end)", metavar="N")
    arg("--log-every", type=int, help="metrics.jsonl line every N steps", metavar="N")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    p.add_argument("--config", default=None, metavar="FILE", help="JSON object of flag values (flags win)")
    add_json_flag(p)


def _add_optimisation_flags(arg) -> None:
    arg("--steps", type=int, help="optimiser steps (or --epochs; neither: one epoch)", metavar="N")
    arg("--epochs", type=int, help="passes over the training data", metavar="N")
    arg("--batch-size", type=int, help="pairs per process per micro-batch", metavar="N")
    arg("--accum", type=int, help="micro-batches per step; the contrastive batch grows N-fold", metavar="N")
    arg("--lr", type=float, help="peak learning rate (AdamW)", metavar="F")
    arg("--wd", type=float, help="weight decay (not on biases, norms, embeddings, temperature)", metavar="F")
    arg("--beta1", type=float, help="AdamW's first-moment decay", metavar="F")
    arg("--beta2", type=float, help="AdamW's second-moment decay", metavar="F")
    arg("--eps", type=float, help="AdamW's epsilon", metavar="F")
    arg("--warmup", type=int, metavar="N",
        help="warmup steps before the decay (default: 30%% of the run's steps, at most 10,000)")
    arg("--schedule", choices=["cosine", "onecycle"],
        help="onecycle: PyTorch's OneCycleLR (cosine warmup from lr/25, decay to lr/250,000, beta1 cycled "
             "+-0.05 against the lr); cosine: linear warmup, cosine decay to zero (open_clip's)")
    arg("--augment", action=argparse.BooleanOptionalAction,
        help="random resized crops (open_clip's scale 0.9-1) instead of the eval preprocess (default: off; "
             "crops slowed learning in the recipes benchmark, README)")
    arg("--grad-clip", type=float, help="clip the gradient norm at F (default: no clipping)", metavar="F")
    arg("--precision", choices=["fp32", "bf16", "fp16", "auto"],
        help="autocast precision (fp16 uses a GradScaler); auto: bf16 where the CPU has AMX or AVX-512 BF16 or the "
             "GPU supports bf16, else fp32; the run logs which it used")
    arg("--local-loss", action="store_true",
        help="with several processes, score only local rows against the gathered batch (less memory)")
    arg("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    arg("--compile", action="store_true", help="torch.compile the model")
    arg("--seed", type=int, help="seed for initialisation, data order and augmentation", metavar="N")
    arg("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def _objectives() -> list[str]:
    from clip_pacl_app.cli.defaults import OBJECTIVES

    return sorted(OBJECTIVES)


def build_config(args: argparse.Namespace):
    """TrainConfig from --config (if any) overridden by the flags given on the command line."""
    from clip_pacl.train import TrainConfig
    from clip_pacl.train.config import read_config_file

    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    skip = {"config", "json", "debug", "_run", "command", "subcommand", "_group_parser"}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    if "pretrained" in values:  # TrainConfig.model takes open_clip's MODEL:TAG, as load does
        fold = argparse.Namespace(model=values.get("model"), pretrained=values.pop("pretrained"))
        fold_pretrained(fold)
        values["model"] = fold.model
    missing = [f"--{k}" for k in ("data", "model", "out") if values.get(k) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from clip_pacl.train import train
    from clip_pacl.train.distributed import env_dist_info

    config = build_config(args)
    result = train(config)
    if not env_dist_info().is_main:  # under torchrun, one process reports the run
        return 0
    if args.json:
        print_json(result.to_dict())
    else:
        val = ", ".join(f"{k} {v:.3f}" for k, v in (result.val or {}).items() if "R@1" in k)
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        log(f"trained {result.steps} steps in {result.seconds:.1f}s, final loss {loss}" + (f", {val}" if val else ""))
        log(f"model: {result.final_model}")
    return 0
