"""The packages' modules import in one direction: no cycles, down the layers, and the library (`clip_pacl`) never
imports the applications (`clip_pacl_app`).

The graph is static (ast): every `import` / `from ... import` of a clip_pacl module anywhere in a file, including
imports inside functions, which hide a cycle from Python's import machinery but not from a reader.
"""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "clip_pacl"
APP = SRC / "clip_pacl_app"



def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `root` (a package is named by its __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The clip_pacl modules `name` imports. `from pkg import sub` names the submodule when `sub` is one, else
    the package (whose __init__ provides the name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: strip level - 1 trailing parts of the package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # `import clip_pacl.x.y` as an attribute path
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph(*roots: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports, over the packages at `roots` (default: the library and the applications)."""
    modules = {name: path for root in roots or (PACKAGE, APP) for name, path in module_files(root).items()}
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# The layers, bottom to top (docs/architecture.md draws the same picture). A module may import its own layer and the
# ones below it, never one above; every top-level module or package must be placed here, so a new one is a decision.
LAYERS = {
    "foundation": ("config", "errors", "console", "device", "limits", "tokenizer", "transforms", "presets", "atomic"),
    "models": ("models",),
    "weights and inputs": ("checkpoint", "formats", "losses", "data", "preprocess", "encode"),
    "training and tasks": ("train", "zeroshot", "retrieval", "segmentation", "eval", "metrics", "guidance",
                           "integrations"),
    "applications": ("clip_pacl_app",),
}
RANK = {part: rank for rank, parts in enumerate(LAYERS.values()) for part in parts}


def layer_of(module: str) -> int | None:
    """The rank of `module`'s layer; None for the public facade `clip_pacl` (lazy names over every layer) and the
    `python -m` aliases (`__main__`), which may call the applications."""
    parts = module.split(".")
    if parts[0] == "clip_pacl_app":
        return RANK["clip_pacl_app"]
    if module == "clip_pacl" or parts[-1] == "__main__":
        return None
    return RANK.get(parts[1], -1)


def is_cli(module: str) -> bool:
    """The applications (`clip_pacl_app`: the CLI, the server, the demo) and `python -m` entry points."""
    return module.startswith("clip_pacl_app") or module.endswith("__main__")


def test_no_import_cycles():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


def test_library_never_imports_the_applications():
    bad = [(m, t) for m, targets in import_graph().items() if not is_cli(m) for t in targets if is_cli(t)]
    assert not bad, f"library modules importing the applications: {bad}"


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) == -1)
    assert not unplaced, f"modules in no layer of LAYERS (place them, and in docs/architecture.md): {unplaced}"


def test_imports_go_down_the_layers():
    bad = [(m, t) for m, targets in import_graph().items() for t in targets
           if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m)]
    assert not bad, f"modules importing a higher layer: {bad}"


def test_the_layer_rule_can_fail():
    """A models module importing the trainer is caught (the rule is not vacuous)."""
    assert layer_of("clip_pacl.train.loop") > layer_of("clip_pacl.models.clip")
    assert layer_of("clip_pacl_app.cli.main") > layer_of("clip_pacl.retrieval.store")
    assert layer_of("clip_pacl.nonexistent") == -1


def docs_layer_rows() -> dict[str, str]:
    """The rows of the layer picture in docs/architecture.md (the fenced block after its `<!-- layers` marker)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    block = text.split("<!-- layers", 1)[1].split("```", 2)[1]
    return {layer: line for line in block.splitlines() for layer in LAYERS if line.startswith(layer)}


def test_the_docs_draw_the_same_layers():
    rows = docs_layer_rows()
    assert list(rows) == list(LAYERS)[::-1], "docs/architecture.md draws other rows than LAYERS (top row first)"
    for layer, parts in LAYERS.items():
        for part in parts:
            present = (PACKAGE / part).exists() or (PACKAGE / f"{part}.py").exists() or part == "clip_pacl_app"
            named = re.search(rf"(?<![\w/]){part}(/|\.py|\b)", rows[layer])
            assert named or not present, f"docs/architecture.md does not draw {part} in the {layer} row"


@pytest.mark.parametrize("source, expected", [
    ("from clip_pacl.b import f\n", {"clip_pacl.b"}),
    ("def g():\n    from clip_pacl import b\n", {"clip_pacl.b"}),
    ("from . import b\nimport clip_pacl.b.attr\n", {"clip_pacl.b"}),
])
def test_the_graph_sees_every_kind_of_import(tmp_path, source, expected):
    root = tmp_path / "clip_pacl"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text(source)
    (root / "b.py").write_text("from clip_pacl.a import g\n")
    graph = import_graph(root)
    assert graph["clip_pacl.a"] == expected
    assert cycles(graph) == [frozenset({"clip_pacl.a", "clip_pacl.b"})]
