"""Text-driven segmentation: score every patch against class prompts, upsample, take the argmax.

Three ways to get per-patch scores, so PACL can be compared with the training-free baselines on one code path:
  "pacl"      PACL's patch embeddings vs its text embeddings (the trained embedders),
  "patch"     a plain CLIP's patch tokens (`encode_image_tokens(x)[:, 1:]`) vs its text embeddings,
  "maskclip"  the same with MaskCLIP's value-path tokens (`encode_image_tokens(x, dense="maskclip")`).
Given a PACL model, "patch" and "maskclip" run on its base CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clip_pacl.errors import ConfigError
from clip_pacl.models.clip import CLIP
from clip_pacl.models.protocol import PatchScorer
from clip_pacl.segmentation.background import BackgroundRule, background_index, resolve_background
from clip_pacl.transforms import OPENAI_MEAN, OPENAI_STD
from clip_pacl.zeroshot.classifier import build_classifier

METHODS = ("pacl", "patch", "maskclip")
DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of a large {}.")
NO_CLASS = 255  # label of pixels left unassigned (below the threshold, no "background" class in the list)
PROMPT_BATCH = 256  # prompts per text-tower call: 100 labels x 80 templates must not be one batch
TILE_ELEMENTS = 2**24  # upsampled scores held at once when labelling by tiles (64 MB of float32)
_MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_STD).view(3, 1, 1)


@dataclass
class SegmentationResult:
    """What `segment` returns for one image: the label map at the image's size, optionally the per-class
    scores it was the argmax of, the class names, and how background was decided."""

    label_map: np.ndarray  # (H, W) int64, index into class_names (NO_CLASS when unassigned)
    scores: torch.Tensor | None  # (C, H, W) per-pixel similarity to each class; None unless asked for
    class_names: list[str]
    background: BackgroundRule = BackgroundRule("prompt")  # how background pixels were decided

    def fractions(self) -> dict[str, float]:
        """Share of the image's pixels given to each class (unassigned pixels count for none)."""
        counts = np.bincount(self.label_map[self.label_map != NO_CLASS].ravel(), minlength=len(self.class_names))
        return {name: float(c) / self.label_map.size for name, c in zip(self.class_names, counts)}


def default_method(model: nn.Module) -> str:
    return "pacl" if isinstance(model, PatchScorer) else "patch"


def _check_method(model: nn.Module, method: str) -> nn.Module:
    """The module whose encoders `method` uses: the PACL model itself, or a (base) CLIP."""
    if method not in METHODS:
        raise ConfigError(f"unknown segmentation method '{method}' (choose from {', '.join(METHODS)})")
    is_pacl = isinstance(model, PatchScorer)
    if method == "pacl":
        if not is_pacl:
            raise ConfigError("method 'pacl' needs a PACL checkpoint; use 'patch' or 'maskclip' for a plain CLIP")
        return model
    encoder = model.clip if is_pacl else model
    if not isinstance(encoder, CLIP):
        raise ConfigError(f"method '{method}' needs a model with patch tokens (encode_image_tokens)")
    return encoder


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def class_embeddings(
    model: nn.Module, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, method: str = "pacl"
) -> torch.Tensor:
    """One normalised text embedding per class (C, D) from the encoder `method` uses, prompt-ensembled."""
    return build_classifier(_check_method(model, method), class_names, templates, batch_size=PROMPT_BATCH)  # (C, D)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> (3, H, W) float, CLIP-normalised, at the image's own size."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - _MEAN) / _STD


def _patch_scores(model: nn.Module, pixels: torch.Tensor, text_features: torch.Tensor, method: str) -> torch.Tensor:
    """(B, 3, h, w) -> per-patch scores (B, C, gh, gw)."""
    encoder = _check_method(model, method)
    if method == "pacl":
        return encoder.patch_similarity(pixels, text_features).float()
    tokens = encoder.encode_image_tokens(pixels, dense="maskclip" if method == "maskclip" else "tokens")[:, 1:]
    tokens = F.normalize(tokens.float(), dim=-1)  # (B, N, D)
    gh, gw = encoder.patch_grid(*pixels.shape[-2:])
    scores = torch.einsum("bnd,cd->bcn", tokens, text_features.to(tokens.dtype))
    return scores.reshape(scores.shape[0], scores.shape[1], gh, gw)


def _stride(model: nn.Module) -> int:
    return model.patch_stride


def _resized_input(image: Image.Image, size: int, stride: int) -> torch.Tensor:
    """Shorter side to `size`, each side a multiple of the patch stride (aspect kept): (3, h, w)."""
    w, h = image.size
    scale = size / min(w, h)
    nw = max(stride, round(w * scale / stride) * stride)
    nh = max(stride, round(h * scale / stride) * stride)
    return _to_tensor(image.convert("RGB").resize((nw, nh), Image.BICUBIC))


@torch.no_grad()
def patch_score_maps(
    model: nn.Module, images: Sequence[Image.Image], text_features: torch.Tensor, method: str = "pacl"
) -> list[torch.Tensor]:
    """Per-patch class scores (C, gh, gw) of each image, resized (shorter side to the model's input size,
    aspect kept) and encoded once; images that end up the same size share a forward pass."""
    size, stride = model.image_size, _stride(model)
    device = _device(model)
    text_features = text_features.to(device)
    inputs = [_resized_input(image, size, stride) for image in images]
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for indices in by_shape.values():
        pixels = torch.stack([inputs[i] for i in indices]).to(device)  # (b, 3, h, w)
        scores = _patch_scores(model, pixels, text_features, method)  # (b, C, gh, gw)
        for i, s in zip(indices, scores):
            out[i] = s
    return out


def _upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, gh, gw) -> (C, H, W), bilinear."""
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def score_maps(
    model: nn.Module,
    images: Sequence[Image.Image],
    text_features: torch.Tensor,
    method: str = "pacl",
    sliding_window: bool = False,
) -> list[torch.Tensor]:
    """Per-pixel class scores (C, H, W) for each image, at the image's own size.

    Without `sliding_window`, the patch scores of `patch_score_maps` upsampled bilinearly. With it, crops
    of the model's input size slide over the image at its own resolution (upscaled first if smaller) with
    50% overlap; each crop's scores are upsampled and averaged per pixel.
    """
    if sliding_window:
        text_features = text_features.to(_device(model))
        return [_sliding_scores(model, image, text_features, method, model.image_size) for image in images]
    patch_scores = patch_score_maps(model, images, text_features, method)
    return [_upsample(s, (image.height, image.width)) for s, image in zip(patch_scores, images)]


def labels_at_size(
    patch_scores: torch.Tensor,
    size: tuple[int, int],
    class_names: Sequence[str],
    background_threshold: float | BackgroundRule | None = None,
) -> np.ndarray:
    """`labels_from_scores` of the (H, W) = `size` bilinear upsampling of (C, gh, gw) scores, computed by
    column tiles so that the (C, H, W) scores (100 classes x 40 MP = 16 GB) never exist at once.

    Bilinear upsampling is separable: the columns are interpolated once, (C, gh, W), then each tile of
    columns along the rows alone, at the sampling positions of the whole (scores equal to ~1e-7). A background
    rule is applied to the whole image's best-score map (H, W) afterwards, so per-image rules see every pixel.
    """
    height, width = size
    rule = _as_rule(background_threshold)
    columns = _upsample(patch_scores, (patch_scores.shape[1], width))  # (C, gh, W)
    step = max(1, TILE_ELEMENTS // (patch_scores.shape[0] * height))
    best = torch.empty(height, width)
    labels = torch.empty(height, width, dtype=torch.long)
    for x in range(0, width, step):
        tile = _upsample(columns[:, :, x:x + step], (height, min(step, width - x)))  # (C, H, w')
        if rule is None:
            labels[:, x:x + step] = tile.argmax(dim=0)
        else:
            best[:, x:x + step], labels[:, x:x + step] = _best_foreground(tile, class_names)
    if rule is None:
        return labels.numpy()
    return _threshold(best, labels, class_names, rule)


def _sliding_scores(
    model: nn.Module, image: Image.Image, text_features: torch.Tensor, method: str, size: int
) -> torch.Tensor:
    device = text_features.device
    w, h = image.size
    scale = max(1.0, size / min(w, h))
    work = image.convert("RGB")
    if scale > 1.0:
        work = work.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    pixels = _to_tensor(work).to(device)  # (3, H', W')
    H, W = pixels.shape[-2:]
    step = max(1, size // 2)
    ys = sorted({*range(0, H - size + 1, step), H - size})
    xs = sorted({*range(0, W - size + 1, step), W - size})
    total = torch.zeros(text_features.shape[0], H, W, device=device)
    count = torch.zeros(1, H, W, device=device)
    for y in ys:
        crops = torch.stack([pixels[:, y : y + size, x : x + size] for x in xs])  # (len(xs), 3, size, size)
        crop_scores = _patch_scores(model, crops, text_features, method)
        crop_scores = F.interpolate(crop_scores, size=(size, size), mode="bilinear", align_corners=False)
        for x, s in zip(xs, crop_scores):
            total[:, y : y + size, x : x + size] += s
            count[:, y : y + size, x : x + size] += 1
    scores = total / count
    if (H, W) != (h, w):
        scores = F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return scores


def labels_from_scores(
    scores: torch.Tensor, class_names: Sequence[str], background_threshold: float | BackgroundRule | None = None
) -> np.ndarray:
    """Argmax over classes (H, W). With a threshold, pixels whose best score is below it become background.

    `background_threshold` is a cosine or a `BackgroundRule` (which may set the threshold per image, see
    `background.py`). A class literally named "background" is then the label for those pixels and is left
    out of the argmax (its prompt would only compete with the threshold); without one they get NO_CLASS.
    Without a threshold, "background" is scored by its prompt like any other class.
    """
    rule = _as_rule(background_threshold)
    if rule is None:
        return scores.argmax(dim=0).cpu().numpy().astype(np.int64)
    best, labels = _best_foreground(scores, class_names)
    return _threshold(best, labels, class_names, rule)


def _as_rule(background_threshold: float | BackgroundRule | None) -> BackgroundRule | None:
    """The rule that thresholds, or None where every pixel simply takes its best class (prompt / none)."""
    if background_threshold is None:
        return None
    if not isinstance(background_threshold, BackgroundRule):
        return BackgroundRule("threshold", float(background_threshold))
    return None if background_threshold.name in ("prompt", "none") else background_threshold


def _best_foreground(scores: torch.Tensor, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(best score (H, W), its class (H, W)) over every class but "background" (kept out of the argmax)."""
    bg = background_index(class_names)
    if bg is not None and len(class_names) > 1:
        scores = scores.clone()
        scores[bg] = float("-inf")
    return scores.max(dim=0)


def _threshold(best: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], rule: BackgroundRule
               ) -> np.ndarray:
    """Pixels whose best foreground score is under the rule's threshold for this image become background."""
    bg = background_index(class_names)
    if bg is not None and len(class_names) == 1:
        return np.full(tuple(best.shape), bg, dtype=np.int64)
    labels = labels.clone()
    labels[best < rule.image_threshold(best)] = bg if bg is not None else NO_CLASS
    return labels.cpu().numpy().astype(np.int64)


def segment(
    model: nn.Module,
    image: Image.Image,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    background_threshold: float | None = None,
    sliding_window: bool = False,
    method: str | None = None,
    text_features: torch.Tensor | None = None,
    keep_scores: bool = True,
    background: str | float | BackgroundRule | None = "auto",
) -> SegmentationResult:
    """Segment one image into `class_names`. `method` defaults to "pacl" for PACL models, else "patch".

    `background` is a rule name ("auto", "zscore", "otsu", "calibrated", "prompt"; see `background.py`), a cosine or a
    resolved `BackgroundRule`; a `background_threshold` overrides it. The result says which rule was used.
    Pass precomputed `text_features` (from `class_embeddings`) to segment many images with one prompt set.
    `keep_scores=False` labels by tiles (`labels_at_size`) and keeps no (C, H, W) scores: the same labels,
    in memory bounded by TILE_ELEMENTS whatever the image size and class count (not with `sliding_window`,
    which sums crops at full resolution).
    """
    method = method or default_method(model)
    rule = background if isinstance(background, BackgroundRule) else resolve_background(
        model, class_names, background if background_threshold is None else background_threshold, method)
    if text_features is None:
        text_features = class_embeddings(model, class_names, templates, method)
    if not keep_scores and not sliding_window:
        (patch_scores,) = patch_score_maps(model, [image], text_features, method)
        labels = labels_at_size(patch_scores, (image.height, image.width), class_names, rule)
        return SegmentationResult(labels, None, list(class_names), rule)
    (scores,) = score_maps(model, [image], text_features, method, sliding_window)
    labels = labels_from_scores(scores, class_names, rule)
    return SegmentationResult(labels, scores.cpu(), list(class_names), rule)
