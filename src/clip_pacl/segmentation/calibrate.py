"""Calibrate PACL's background threshold on its own training captions: no masks, no test labels.

A caption describes the objects of its image, so the image's patches scored against its own caption
(s_i = <e_v(v_i), e_t(caption)>) split into two groups: the described objects score high, the rest of the
image low. The Otsu split of those scores, pooled over many training images, is a cosine under which a
patch matches nothing a caption would name: the background threshold. It is stored in the checkpoint's
PACL config (`background_threshold`), where `clip_pacl.segmentation.background` finds it.

`clip-pacl calibrate` runs it on a checkpoint; `--background calibrated` then uses it. It is not the
default: on the synthetic sets the caption scores split lower than class-prompt scores do (README, "Background
without labels"), so per-image Otsu segments better there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from clip_pacl.checkpoint.files import CONFIG_NAME, save_json
from clip_pacl.data import load_image
from clip_pacl.data.formats import read_caption_rows
from clip_pacl.data.rows import CaptionRow
from clip_pacl.errors import CheckpointError, ConfigError, DataError
from clip_pacl.segmentation.background import otsu_threshold

CALIBRATION_IMAGES = 1000  # distinct training images scored: one Otsu split of all their patch scores, pooled


def _one_row_per_image(rows: Sequence[CaptionRow], limit: int) -> list[CaptionRow]:
    seen: dict[Path, CaptionRow] = {}
    for row in rows:
        seen.setdefault(row.image, row)
        if len(seen) >= limit:
            break
    return list(seen.values())


@torch.no_grad()
def caption_patch_scores(model: torch.nn.Module, rows: Sequence[CaptionRow], batch_size: int = 64,
                         progress: bool = False) -> torch.Tensor:
    """Each row's image patches scored against the row's own caption (n, N); unreadable images are skipped.

    The scores are cosines on segmentation's scale: L2-normalised patch embeddings against the L2-normalised
    text embedding, as `PACL.patch_similarity` compares patches with class prompts."""
    from clip_pacl.preprocess import model_tokenizer, model_transform

    if not hasattr(model, "patch_embeddings"):
        raise ConfigError("background calibration needs a PACL model (it scores patches with PACL's embedders)")
    transform, tokenizer = model_transform(model), model_tokenizer(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for first in tqdm(range(0, len(rows), batch_size), desc="calibrate", unit="batch", disable=not progress):
        pixels, captions = [], []
        for row in rows[first:first + batch_size]:
            try:
                pixels.append(transform(load_image(row.image)))
            except DataError:
                continue
            captions.append(row.caption)
        if not pixels:
            continue
        patches = model.patch_embeddings(torch.stack(pixels).to(device))  # (B, N, D)
        text = model.encode_text(tokenizer(captions).to(device), normalize=True)  # (B, D), unit length
        out.append(torch.einsum("bnd,bd->bn", patches.float(), text.float()).cpu())
    model.train(was_training)
    if not out:
        raise DataError("none of the calibration images could be read")
    return torch.cat(out)


def calibrate_background(model: torch.nn.Module, data: str | Path, *, limit: int = CALIBRATION_IMAGES,
                         batch_size: int = 64, data_format: str | None = None, image_key: str = "image",
                         caption_key: str = "caption", images_dir: str | Path | None = None,
                         progress: bool = False) -> dict:
    """The background threshold from caption data (what PACL trained on): the Otsu split of own-caption scores."""
    if limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {limit})")
    rows = _one_row_per_image(read_caption_rows(data, data_format=data_format, image_key=image_key,
                                                caption_key=caption_key, images_dir=images_dir), limit)
    if not rows:
        raise DataError(f"{data} has no caption rows")
    scores = caption_patch_scores(model, rows, batch_size, progress)  # (n, N)
    threshold = otsu_threshold(scores)
    return {"background_threshold": round(threshold, 6), "images": scores.shape[0], "patches": scores.numel(),
            "object_fraction": round(float((scores >= threshold).float().mean()), 4), "data": str(data),
            "rule": "Otsu split of training-caption patch scores"}


def write_calibration(model: torch.nn.Module, model_dir: str | Path, threshold: float) -> None:
    """Store `threshold` in the model's PACL config, in memory and in `model_dir/config.json` (nothing else changes)."""
    path = Path(model_dir) / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if cfg.get("model_type") != "pacl":
        raise CheckpointError(f"{model_dir} is not a PACL checkpoint (its {CONFIG_NAME} has no model_type 'pacl')")
    cfg.setdefault("pacl", {})["background_threshold"] = threshold
    save_json(cfg, path)
    model.config = replace(model.config, background_threshold=threshold)

