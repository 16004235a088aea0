"""No function in src/ is longer than MAX_LINES (a reader should see a function whole).

`python tests/test_function_lengths.py [N]` prints the N longest functions of the whole tree (default 15).
"""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"  # the library clip_pacl and the applications clip_pacl_app
MAX_LINES = 80


def function_lengths(root: Path = SRC) -> list[tuple[int, str]]:
    """(lines, "path:line name") for every function and method under `root`, longest first."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                found.append((node.end_lineno - start + 1, where))
    return sorted(found, reverse=True)


def test_functions_are_short():
    too_long = [(n, where) for n, where in function_lengths() if n > MAX_LINES]
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"


def test_lengths_are_measured(tmp_path):
    (tmp_path / "m.py").write_text("@decorator\ndef f():\n" + "    x = 1\n" * 90 + "\n\ndef g():\n    pass\n")
    assert [n for n, _ in function_lengths(tmp_path)] == [92, 2]


if __name__ == "__main__":
    for lines, where in function_lengths()[: int(sys.argv[1]) if len(sys.argv) > 1 else 15]:
        print(f"{lines:4d}  {where}")
