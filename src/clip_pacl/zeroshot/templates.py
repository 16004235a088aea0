"""Prompt templates and ImageNet-1k class names for zero-shot classification.

Zero-shot accuracy depends on the prompt as much as on the model (CLIP paper, section 3.1.4), so the
standard prompts ship here and every evaluation can name the set it used. The data is OpenAI's (CLIP
repository, `notebooks/Prompt_Engineering_for_ImageNet.ipynb`), copied from open_clip's
`zero_shot_metadata.py` (MIT licence): the 80 ImageNet templates, the 7-template subset OpenAI found
about as good, and the cleaned ImageNet-1k class names. A template is a string with one `{}`
where the class name goes. The data lives in `templates.json` beside this file (package data); this
module reads it once and resolves `--templates` / `--classes` arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from clip_pacl.errors import DataError

_DATA = json.loads((Path(__file__).with_name("templates.json")).read_text(encoding="utf-8"))
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(_DATA["openai_imagenet_templates"])  # 80 templates
SIMPLE_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(_DATA["simple_imagenet_templates"])  # OpenAI's 7
IMAGENET_CLASSNAMES: tuple[str, ...] = tuple(_DATA["imagenet_classnames"])  # 1,000, in ImageNet-1k's label order

# suffixes that make a --classes argument a file name, not a class name
CLASS_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".lst", ".list", ".names", ".text")

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}


def format_prompt(template: str, class_name: str) -> str:
    """Fill a template's `{}` slot(s) with a class name (other braces are left alone)."""
    return template.replace("{}", class_name)


def check_template(template: str) -> str:
    """A template without a slot would give every class the same prompt, hence chance accuracy: refuse it."""
    if "{}" not in template:
        raise DataError(f"template {template!r} has no '{{}}' where the class name goes")
    return template


def resolve_templates(spec: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """Templates from a named set (`openai`, `simple`), a text file (one per line), and/or explicit strings.

    With neither a spec nor explicit templates, the 80 OpenAI templates are used (as in the CLIP paper).
    """
    templates: list[str] = []
    if spec is not None:
        if spec in TEMPLATE_SETS:
            templates += TEMPLATE_SETS[spec]
        else:
            templates += read_lines(Path(spec), what="templates")
    templates += extra
    if not templates:
        templates = list(OPENAI_IMAGENET_TEMPLATES)
    return [check_template(t) for t in templates]


def looks_like_path(spec: str) -> bool:
    """Whether `--classes` text names a file: a path separator or a file suffix (`.txt`, `.csv`, ...), no comma."""
    if "," in spec:
        return False
    return "/" in spec or os.sep in spec or Path(spec).suffix.lower() in CLASS_FILE_SUFFIXES


def resolve_class_names(spec: str) -> list[str]:
    """Class names from `imagenet`, a text file (one per line) or a comma-separated list. Text shaped like a
    path (`looks_like_path`) must be an existing file: a mistyped file name never becomes a class."""
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    path = Path(spec)
    if not path.is_file() and looks_like_path(spec):
        raise DataError(f"class-name file {spec} does not exist (to give class names instead, separate them "
                        "with commas)")
    names = read_lines(path, what="class names") if path.is_file() else [c.strip() for c in spec.split(",")]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"no class names in {spec!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"class names are repeated: {', '.join(duplicates)}")
    return names


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file; a missing file is a one-line error naming what it should hold."""
    if not path.is_file():
        raise DataError(f"{path} is not a file of {what} (one per line)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path} has no {what}")
    return lines
