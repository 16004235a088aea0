"""The package's modules import in one direction: no cycles, and library code never imports the CLI.

The graph is static (ast): every `import` / `from ... import` of a clip_pacl module anywhere in a file, including
imports inside functions, which hide a cycle from Python's import machinery but not from a reader.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "clip_pacl"



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


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root)
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


def is_cli(module: str) -> bool:
    """The command-line layer: cli/ and `python -m` entry points (`__main__` modules)."""
    return module.startswith("clip_pacl.cli") or module.endswith("__main__")


def test_no_import_cycles():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


def test_library_never_imports_the_cli():
    bad = [(m, t) for m, targets in import_graph().items() if not is_cli(m) for t in targets if is_cli(t)]
    assert not bad, f"library modules importing the CLI: {bad}"


def test_models_do_not_import_checkpoint_or_losses():
    graph = import_graph()
    bad = [(m, t) for m, targets in graph.items() if m.startswith("clip_pacl.models")
           for t in targets if t.startswith(("clip_pacl.checkpoint", "clip_pacl.losses", "clip_pacl.train"))]
    assert not bad, f"models importing higher layers: {bad}"


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
