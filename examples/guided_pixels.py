"""Steer the pixels of an image toward a text prompt with CLIP guidance, and write the before/after images.

The smallest generator there is (the pixels themselves), so what you see is what CLIP's gradient asks for:

    python examples/guided_pixels.py --model runs/clip --prompt "a red circle" --steps 200 --out guided/

Swap the pixels for a diffusion model's x0 prediction or a GAN's output and the loop stays the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clip_pacl
from clip_pacl.errors import ClipPaclError
from clip_pacl.guidance import CLIPGuidance


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL RGB."""
    return Image.fromarray((pixels[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="checkpoint dir, training run dir, model file or preset")
    parser.add_argument("--prompt", required=True, help="what the image should show")
    parser.add_argument("--steps", type=int, default=100, help="optimisation steps")
    parser.add_argument("--out", type=Path, required=True, help="folder for before.png and after.png")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's input)")
    parser.add_argument("--cutouts", type=int, default=16, help="random crops scored per step")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise and the cutouts")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        model = clip_pacl.load(args.model).eval().requires_grad_(False)
        guidance = CLIPGuidance(model, args.prompt, cutouts=args.cutouts,
                                generator=torch.Generator().manual_seed(args.seed))
        size = args.size or model.image_size
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))  # (1, 3, H, W)
        args.out.mkdir(parents=True, exist_ok=True)
        to_image(pixels).save(args.out / "before.png")
        before = float(guidance.similarity(pixels)[0, 0])
        pixels = guidance.optimize_pixels(pixels, args.steps, lr=args.lr)
        after = float(guidance.similarity(pixels)[0, 0])
        to_image(pixels).save(args.out / "after.png")
    except (ClipPaclError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"cosine to {args.prompt!r}: {before:.4f} -> {after:.4f}; wrote {args.out / 'before.png'} and "
          f"{args.out / 'after.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
