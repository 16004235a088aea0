"""Public classes in src/ say what they are: at least MIN_SHARE of them have a docstring.

`python tests/test_docstrings.py` prints the count and the public classes without one.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"  # the library clip_pacl and the applications clip_pacl_app
MIN_SHARE = 0.90


def public_classes(root: Path = SRC) -> list[tuple[bool, str]]:
    """(has a docstring, "path:line Name") for every class under `root` whose name does not start with "_"
    (nested classes included)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                found.append((bool(ast.get_docstring(node)), where))
    return found


def test_public_classes_are_documented():
    classes = public_classes()
    share = sum(documented for documented, _ in classes) / len(classes)
    missing = [where for documented, where in classes if not documented]
    assert share >= MIN_SHARE, f"{share:.0%} of public classes documented (< {MIN_SHARE:.0%}); missing: {missing}"


def test_classes_are_counted(tmp_path):
    (tmp_path / "m.py").write_text('class A:\n    """Doc."""\n\n    class B:\n        x = 1\n\n\nclass _C:\n    pass\n')
    assert [(documented, where.split()[-1]) for documented, where in public_classes(tmp_path)] == [
        (True, "A"), (False, "B")]


if __name__ == "__main__":
    classes = public_classes()
    print(f"{sum(d for d, _ in classes)}/{len(classes)} public classes documented")
    for documented, where in classes:
        if not documented:
            print(f"  {where}")
