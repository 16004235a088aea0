"""Every module path, file, function and name the README and docs/ put in backticks exists (issue 19, "CI walks it
too"; item 17 found `checkpoint/format.py`, `load_state` and `OUT/step-N/` named in docs/architecture.md, none real).

What is checked, per inline code span (fenced blocks are run by tests/test_readme.py):
- `clip_pacl.x.y` (optionally called, `clip_pacl.load(...)`): imports and resolves, attribute by attribute;
- a file path (`models/inference.py`, `benchmarks/encode.py`, `formats/convert_*.py`, a bare `figure.py`): exists in
  the repository, in `src/`, or in the package (a bare name anywhere in the package or the repository's scripts);
  `path.py::name` also defines `name`;
- a folder of the package or the repository (`cli/`, `presets/*.json`, `benchmarks/results/`): exists;
- a snake_case or CamelCase name, dotted or called (`model_tokenizer(model)`, `ImageIndex.save`): each part is a name
  the code defines or uses somewhere (src, tests, benchmarks, examples, docs scripts), or imports from the library it
  names (`torch.utils.flop_counter`);
- run and index layout names (`OUT/final/`, `demo_out/report.html`, `IDX/ann.faiss`) are checked against a real
  `clip-pacl demo --quick` output by tests/test_readme.py::test_layout_names_exist.
Names on the user's side (`runs/clip`, `syn_val/...`, `photos/2023/`) are not the code's and are not checked.
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "clip_pacl"
APP = ROOT / "src" / "clip_pacl_app"
PACKAGES = (PACKAGE, APP)  # the library and the applications: a bare `cli/main.py` is found in either
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = [ROOT / "src", ROOT / "tests", ROOT / "benchmarks", ROOT / "examples", ROOT / "docs"]
REPO_DIRS = {"src", "tests", "benchmarks", "docs", "examples", ".ci"}
LAYOUT_ROOTS = ("OUT/", "demo_out/", "IDX/", ".IDX.shards/")
EXTERNAL = ("torch", "open_clip", "transformers", "faiss", "huggingface_hub", "timm", "numpy", "PIL", "onnxruntime",
            "sklearn", "torchmetrics", "lightning", "open_clip_train")
# Names of other projects' code that the README discusses without an importable prefix (open_clip's training script,
# PyTorch's schedulers, faiss index types, transformers classes): not ours to define.
OTHER_PROJECTS = {"VisionTransformer", "init_parameters", "train_one_epoch", "ClipLoss", "cosine_lr", "OneCycleLR",
                  "IndexFlatIP", "CLIPProcessor", "max_memory_allocated", "from_pretrained", "create_model",
                  "weights_only", "get_pretrained_cfg", "save_for_hf", "CLIP_benchmark"}
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# Not the code's names, or not there yet, each with its reason.
ALLOWED = {
    "syn_val": "the README's own data folder (`clip-pacl data synthetic --out syn_val`)",
    "runs/clip": "the README's own run folder",
    "benchmarks/results/gpu_*.jsonl": "what benchmarks/gpu.sh appends to on a GPU; it has not run on one yet (README)",
}


def code_spans(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span outside fenced blocks; `\\|` (a table's escaped bar) unescaped."""
    spans, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            spans += [(number, m.group(1).replace("\\|", "|")) for m in re.finditer(r"`([^`\n]+)`", line)]
    return spans


def all_spans() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}:{line}", span) for path in DOCS for line, span in code_spans(path)]


@cache
def known_names() -> frozenset[str]:
    """Every identifier the code defines, uses, passes as a keyword or spells as a string (JSON keys, flags)."""
    names = set()
    for root in CODE_DIRS:
        for file in root.rglob("*.py"):
            if file.resolve() == Path(__file__).resolve():  # its own examples of names that do not exist
                continue
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Name):
                    names.add(node.id)
                elif isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                    names.add(node.arg)
                elif isinstance(node, ast.alias):
                    names.update(node.name.split("."))
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names.update(re.findall(NAME, node.value))
    for results in (ROOT / "benchmarks" / "results").glob("*.jsonl"):  # fields the benchmarks write (f-strings)
        names.update(re.findall(rf'"({NAME})":', results.read_text()))
    return frozenset(names)


def resolve_dotted(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def find_file(path: str) -> list[Path]:
    """Files or folders `path` (a glob allowed) names: from the repository root, `src/`, the package; a bare
    file name anywhere in the package or the repository's script folders."""
    if "/" not in path.rstrip("/"):
        found = [p for root in (*PACKAGES, *(ROOT / d for d in REPO_DIRS)) for p in root.rglob(path)]
        if found or path.endswith(".py"):
            return found
    return [p for base in (ROOT, ROOT / "src", *PACKAGES) for p in base.glob(path.rstrip("/"))]


def defines(file: Path, name: str) -> bool:
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def problem(span: str) -> str | None:
    """Why `span` names something that does not exist, or None (it exists, or is not the code's to check)."""
    text = re.sub(r"\(.*\)$", "", span.strip())  # `f(x, y)` names f
    if text in ALLOWED or text.startswith(LAYOUT_ROOTS) or " " in text or "=" in text:
        return None
    if re.fullmatch(rf"clip_pacl(_app)?(\.{NAME})+", text):
        try:
            resolve_dotted(text)
        except (ImportError, AttributeError) as e:
            return f"does not resolve ({e})"
        return None
    file, _, func = text.partition("::")
    first = file.split("/")[0]
    in_repo = first in REPO_DIRS or (first and any((p / first).is_dir() for p in PACKAGES))
    if file.endswith(".py") or (("/" in file or "*" in file) and in_repo):
        found = find_file(file)
        if not found:
            return "no such file or folder"
        if func and not any(defines(f, func.split(".")[-1]) for f in found if f.is_file()):
            return f"{file} does not define {func}"
        return None
    if re.fullmatch(rf"{NAME}(\.{NAME})*", text) and _looks_like_code(text):
        if text.split(".")[0] in EXTERNAL:
            try:
                resolve_dotted(text)
            except (ImportError, AttributeError) as e:
                return f"does not resolve ({e})"
            return None
        unknown = [p for p in text.split(".") if p not in known_names() and p not in OTHER_PROJECTS]
        return f"the code has no name {', '.join(unknown)}" if unknown else None
    return None


def _looks_like_code(text: str) -> bool:
    """snake_case with an underscore, CamelCase, or dotted: a word like `tiny` or `auto` is not checked."""
    return "." in text or bool(re.search(r"[a-z0-9]_[a-z]", text)) or bool(re.fullmatch(r"(?:[A-Z][a-z0-9]+){2,}\w*",
                                                                                      text))


def test_named_code_exists():
    missing = [f"{where}: `{span}`: {why}" for where, span in all_spans() if (why := problem(span))]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("span, why", [
    ("checkpoint/format.py", "no such file or folder"),
    ("clip_pacl.checkpoint.load_state", "does not resolve"),
    ("retrieval/build.py::no_such_function", "does not define"),
    ("load_state", "the code has no name load_state"),
    ("torch.no_such_module", "does not resolve"),
])
def test_the_check_finds_what_does_not_exist(span, why):
    assert why in (problem(span) or "")


@pytest.mark.parametrize("span", ["checkpoint/files.py", "retrieval/build.py::build_index", "clip_pacl.load",
                                  "model_tokenizer(model)", "runs/clip", "ImageIndex.save", "presets/*.json",
                                  "torch.utils.flop_counter"])
def test_the_check_accepts_what_exists(span):
    assert problem(span) is None
