"""Zero-shot classification: prompt templates, ImageNet class names, prompt-ensembled classifiers."""

from clip_pacl.zeroshot.classifier import build_classifier, class_probabilities
from clip_pacl.zeroshot.templates import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    format_prompt,
    resolve_class_names,
    resolve_templates,
)

__all__ = [
    "IMAGENET_CLASSNAMES",
    "OPENAI_IMAGENET_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "build_classifier",
    "class_probabilities",
    "format_prompt",
    "resolve_class_names",
    "resolve_templates",
]
