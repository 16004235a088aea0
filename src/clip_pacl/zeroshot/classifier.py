"""Zero-shot classifiers: class names -> prompt-ensembled text embeddings, and the probabilities they give.

A classifier is a (C, D) tensor of L2-normalised text embeddings, one row per class. Images are scored
with `model.similarity(images, classifier)`: cosine for CLIP, the patch-aligned compatibility for PACL,
so the same code classifies with either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clip_pacl.encode import encode_texts, evaluating
from clip_pacl.errors import DataError
from clip_pacl.models.protocol import ContrastiveModel
from clip_pacl.zeroshot.templates import OPENAI_IMAGENET_TEMPLATES, check_template, format_prompt


def build_classifier(
    model: ContrastiveModel,
    class_names: Sequence[str],
    templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """(C, D) classifier: per class, the mean of its L2-normalised prompt embeddings, renormalised.

    Averaging in embedding space over many phrasings ("a photo of a {}.", "a sketch of the {}.", ...)
    is the CLIP paper's prompt ensembling; it gains several points of ImageNet accuracy over one prompt.
    The one prompt-ensembling function: zero-shot classification and segmentation both use it, with the model's
    own tokenizer; bad input (no classes, no templates, a template without `{}`) is a DataError.
    """
    if not class_names:
        raise DataError("no class names to build a classifier from")
    if not templates:
        raise DataError("no prompt templates to build a classifier from")
    templates = [check_template(t) for t in templates]
    prompts = [format_prompt(t, name) for name in class_names for t in templates]
    features = encode_texts(model, prompts, batch_size, progress=progress, desc="prompts")  # (C*T, D)
    features = features.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(features, dim=-1)


def class_probabilities(model: ContrastiveModel, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(B, C) softmax over classes of logit_scale * similarity, as CLIP turns zero-shot scores into probabilities.

    The learned temperature matters here (not for accuracy): it decides how peaked the probabilities are.
    A SigLIP model (one with a logit bias) was trained with an independent sigmoid per image-text pair,
    so its probabilities are sigmoid(logit_scale * similarity + logit_bias) and need not sum to 1.
    """
    with evaluating(model), torch.inference_mode():
        logits = model.logit_scale.exp().float() * model.similarity(images, classifier).float()  # (B, C)
        bias = model.logit_bias
        return (logits + bias.float()).sigmoid() if bias is not None else logits.softmax(dim=-1)
