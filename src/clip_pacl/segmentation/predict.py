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
from clip_pacl.segmentation.background import BackgroundRule, background_index, resolve_background
from clip_pacl.transforms import OPENAI_MEAN, OPENAI_STD

METHODS = ("pacl", "patch", "maskclip")
DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of a large {}.")
NO_CLASS = 255  # label of pixels left unassigned (below the threshold, no "background" class in the list)
_MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_STD).view(3, 1, 1)


@dataclass
class SegmentationResult:
    label_map: np.ndarray  # (H, W) int64, index into class_names (NO_CLASS when unassigned)
    scores: torch.Tensor  # (C, H, W) per-pixel similarity to each class
    class_names: list[str]
    background: BackgroundRule = BackgroundRule("prompt")  # how background pixels were decided

    def fractions(self) -> dict[str, float]:
        """Share of the image's pixels given to each class (unassigned pixels count for none)."""
        counts = np.bincount(self.label_map[self.label_map != NO_CLASS].ravel(), minlength=len(self.class_names))
        return {name: float(c) / self.label_map.size for name, c in zip(self.class_names, counts)}


def default_method(model: nn.Module) -> str:
    return "pacl" if hasattr(model, "patch_similarity") else "patch"


def _check_method(model: nn.Module, method: str) -> nn.Module:
    """The module whose encoders `method` uses: the PACL model itself, or a (base) CLIP."""
    if method not in METHODS:
        raise ConfigError(f"unknown segmentation method '{method}' (choose from {', '.join(METHODS)})")
    is_pacl = hasattr(model, "patch_similarity")
    if method == "pacl":
        if not is_pacl:
            raise ConfigError("method 'pacl' needs a PACL checkpoint; use 'patch' or 'maskclip' for a plain CLIP")
        return model
    encoder = model.clip if is_pacl else model
    if not hasattr(encoder, "encode_image_tokens"):
        raise ConfigError(f"method '{method}' needs a model with patch tokens (encode_image_tokens)")
    return encoder


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def class_embeddings(
    model: nn.Module, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, method: str = "pacl"
) -> torch.Tensor:
    """One normalised text embedding per class (C, D): the mean over prompt templates, renormalised."""
    from clip_pacl.tokenizer import tokenize

    if not class_names:
        raise ConfigError("no class names given")
    if not templates:
        raise ConfigError("no prompt templates given")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(f"template '{bad[0]}' has no '{{}}' where the class name goes")
    encoder = _check_method(model, method)
    prompts = [t.format(name) for name in class_names for t in templates]
    tokens = tokenize(prompts, context_length=encoder.context_length).to(_device(model))
    feats = encoder.encode_text(tokens, normalize=True).float()  # (C * T, D)
    feats = feats.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)  # (C, D)


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
    vision = encoder.config.vision
    stride = 32 if vision.is_resnet else vision.patch_size
    gh, gw = pixels.shape[-2] // stride, pixels.shape[-1] // stride
    scores = torch.einsum("bnd,cd->bcn", tokens, text_features.to(tokens.dtype))
    return scores.reshape(scores.shape[0], scores.shape[1], gh, gw)


def _stride(model: nn.Module) -> int:
    vision = (model.clip if hasattr(model, "patch_similarity") else model).config.vision
    return 32 if vision.is_resnet else vision.patch_size


def _resized_input(image: Image.Image, size: int, stride: int) -> torch.Tensor:
    """Shorter side to `size`, each side a multiple of the patch stride (aspect kept): (3, h, w)."""
    w, h = image.size
    scale = size / min(w, h)
    nw = max(stride, round(w * scale / stride) * stride)
    nh = max(stride, round(h * scale / stride) * stride)
    return _to_tensor(image.convert("RGB").resize((nw, nh), Image.BICUBIC))


@torch.no_grad()
def score_maps(
    model: nn.Module,
    images: Sequence[Image.Image],
    text_features: torch.Tensor,
    method: str = "pacl",
    sliding_window: bool = False,
) -> list[torch.Tensor]:
    """Per-pixel class scores (C, H, W) for each image, at the image's own size.

    Without `sliding_window` each image is resized (shorter side to the model's input size, aspect kept)
    and encoded once; images that end up the same size share a forward pass. With it, crops of the
    model's input size slide over the image at its own resolution (upscaled first if smaller) with 50%
    overlap; each crop's scores are upsampled and averaged per pixel.
    """
    size, stride = model.image_size, _stride(model)
    device = _device(model)
    text_features = text_features.to(device)
    if sliding_window:
        return [_sliding_scores(model, image, text_features, method, size) for image in images]
    inputs = [_resized_input(image, size, stride) for image in images]
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for indices in by_shape.values():
        pixels = torch.stack([inputs[i] for i in indices]).to(device)  # (b, 3, h, w)
        scores = _patch_scores(model, pixels, text_features, method)  # (b, C, gh, gw)
        for i, s in zip(indices, scores):
            w, h = images[i].size
            out[i] = F.interpolate(s[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return out


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
    rule = background_threshold if isinstance(background_threshold, BackgroundRule) else (
        None if background_threshold is None else BackgroundRule("threshold", float(background_threshold)))
    if rule is None or rule.name in ("prompt", "none"):
        return scores.argmax(dim=0).cpu().numpy().astype(np.int64)
    bg = background_index(class_names)
    fg_scores = scores.clone()
    if bg is not None:
        if len(class_names) == 1:
            return np.full(scores.shape[1:], bg, dtype=np.int64)
        fg_scores[bg] = float("-inf")
    best, labels = fg_scores.max(dim=0)
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
    background: str | float | BackgroundRule | None = "auto",
) -> SegmentationResult:
    """Segment one image into `class_names`. `method` defaults to "pacl" for PACL models, else "patch".

    `background` is a rule name ("auto", "calibrated", "otsu", "prompt"; see `background.py`), a cosine or a
    resolved `BackgroundRule`; a `background_threshold` overrides it. The result says which rule was used.
    Pass precomputed `text_features` (from `class_embeddings`) to segment many images with one prompt set.
    """
    method = method or default_method(model)
    rule = background if isinstance(background, BackgroundRule) else resolve_background(
        model, class_names, background if background_threshold is None else background_threshold, method)
    if text_features is None:
        text_features = class_embeddings(model, class_names, templates, method)
    (scores,) = score_maps(model, [image], text_features, method, sliding_window)
    labels = labels_from_scores(scores, class_names, rule)
    return SegmentationResult(labels, scores.cpu(), list(class_names), rule)
