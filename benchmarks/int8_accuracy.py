"""Int8 inference against float32 on a trained model: zero-shot and retrieval accuracy, and feature cosines.

Without --model, it writes the built-in synthetic set (--n training images, --heldout more listed only in the
*_heldout.csv files) and trains the `tiny` architecture at --image-size on its captions for --steps steps (the
default CLIP recipe otherwise); with --model, it evaluates that model on --data (a folder `clip-pacl data synthetic`
wrote). Then the float32 model and its int8 copy (`clip_pacl.quantize_int8`) are evaluated the same way on the
held-out images: zero-shot top-1 over shapes and over colours (the set's own templates), retrieval recall@1/5 both
ways over the held-out captions, and the cosine between each image's (and caption's) int8 and float32 features.
The same cosines are also taken for a randomly initialised model of the same architecture, the worst case for
quantization (no trained structure in the weights).

    python benchmarks/int8_accuracy.py --workdir /tmp/clip_pacl_int8 --n 2000 --heldout 300 --steps 200 --threads 2

One JSON line per (model, metric) is appended to benchmarks/results/int8_accuracy.jsonl and a table is printed.
CPU only: int8 inference runs on PyTorch's dynamic-quantization kernels (fbgemm, qnnpack), which have no CUDA
implementation; --device cuda is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.data import read_caption_rows, read_label_rows
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.encode import encode_images, encode_texts
from clip_pacl.retrieval.evaluate import evaluate_retrieval
from clip_pacl.train import TrainConfig, train
from clip_pacl.zeroshot.evaluate import evaluate_zeroshot
from clip_pacl.zeroshot.templates import resolve_templates

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402


def train_tiny(workdir: Path, data: Path, image_size: int, steps: int, batch_size: int, seed: int) -> Path:
    """The tiny preset at `image_size` (its native resolution), trained on the set's captions: the final model."""
    config = json.loads(resources.files("clip_pacl.presets").joinpath("tiny.json").read_text())
    config["vision_cfg"]["image_size"] = image_size
    (workdir / "tiny.json").write_text(json.dumps(config))
    result = train(TrainConfig(data=str(data / "captions.csv"), model=str(workdir / "tiny.json"),
                               out=str(workdir / "run"), steps=steps, batch_size=batch_size, lr=2e-3, seed=seed,
                               device="cpu", progress=False, workers=0))
    return Path(result.final_model)


def accuracy(model: torch.nn.Module, data: Path) -> dict[str, float]:
    """Held-out zero-shot top-1 (shapes, colours) and retrieval recall, as fractions."""
    scores = {}
    for kind, folder in (("shapes", "segmentation"), ("colors", "segmentation_colors")):
        rows = read_label_rows(data / f"{kind}_heldout.csv")
        names = (data / folder / "classes.txt").read_text().split()
        names = [n for n in names if n != "background"]
        templates = resolve_templates(str(data / folder / "templates.txt"))
        result = evaluate_zeroshot(model, rows, templates, class_names=names, progress=False)
        scores[f"zeroshot_{kind}_top1"] = result["top1"]
    result = evaluate_retrieval(model, read_caption_rows(data / "captions_heldout.csv"), progress=False)
    scores.update({key: result[key] for key in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1",
                                                "text_to_image_R@5")})
    return scores


def cosines(model: torch.nn.Module, int8: torch.nn.Module, data: Path) -> dict[str, float]:
    """Min and mean cosine between int8 and float32 features of the held-out images and captions."""
    rows = read_caption_rows(data / "captions_heldout.csv")
    images = sorted({row.image for row in rows})
    captions = [row.caption for row in rows]
    out = {}
    for name, encode in (("image", lambda m: encode_images(m, images, progress=False)[0]),
                         ("text", lambda m: encode_texts(m, captions))):
        cos = F.cosine_similarity(encode(model), encode(int8), dim=-1)
        out[f"{name}_cosine_min"], out[f"{name}_cosine_mean"] = float(cos.min()), float(cos.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu only: int8 inference has no CUDA kernels (cuda is refused with an error)")
    parser.add_argument("--model", type=Path, default=None, help="a trained model (default: train tiny here)")
    parser.add_argument("--data", type=Path, default=None, help="with --model: the synthetic set's folder")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clip_pacl_int8"))
    parser.add_argument("--n", type=int, default=2000, help="training images of the synthetic set")
    parser.add_argument("--heldout", type=int, default=300, help="held-out images")
    parser.add_argument("--image-size", type=int, default=32, help="tiny's native resolution for this run")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_accuracy.jsonl")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.exit(2, "error: int8_accuracy.py is CPU only: PyTorch's dynamic int8 kernels (fbgemm, qnnpack) have "
                       "no CUDA implementation\n")
    torch.set_num_threads(args.threads)
    data = args.data or args.workdir / "data"
    if args.model is None:
        if not (data / "captions_heldout.csv").is_file():
            generate_synthetic(data, args.n, seed=args.seed, image_size=64, max_objects=1, heldout=args.heldout)
        args.model = train_tiny(args.workdir, data, args.image_size, args.steps, args.batch_size, args.seed)
    model = clip_pacl.load(args.model, random_weights=True).eval()
    int8 = clip_pacl.quantize_int8(model)
    fp32_scores, int8_scores = accuracy(model, data), accuracy(int8, data)
    torch.manual_seed(args.seed)
    random_model = clip_pacl.CLIP(model.config).eval()
    common = {"model": str(args.model), "data": str(data), **machine_info(),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    records = [{"metric": key, "fp32": fp32_scores[key], "int8": int8_scores[key],
                "diff_points": round(100 * (int8_scores[key] - fp32_scores[key]), 2), **common} for key in fp32_scores]
    for weights, reference in (("trained", model), ("random", random_model)):
        for key, value in cosines(reference, clip_pacl.quantize_int8(reference), data).items():
            records.append({"metric": f"{key} ({weights} weights)", "int8": value, **common})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"{'metric':<36} {'fp32':>8} {'int8':>8} {'diff (points)':>13}")
    for r in records:
        fp32 = f"{100 * r['fp32']:8.2f}" if "fp32" in r else f"{'':>8}"
        int8_value = f"{100 * r['int8']:8.2f}" if "fp32" in r else f"{r['int8']:8.5f}"
        print(f"{r['metric']:<36} {fp32} {int8_value} {r.get('diff_points', ''):>13}")


if __name__ == "__main__":
    main()
