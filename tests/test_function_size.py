"""No function over 80 lines in the daemon, its tools or the trainer (issue 12).

A long function is where a change hides a second job: the restructure split
every one of them into named steps, and this keeps it so. The count is the
function's whole extent in the source (signature, docstring and body), as
:mod:`ast` gives it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80


def long_functions(top: Path, limit: int = LIMIT) -> list[str]:
    """``path:line name (n lines)`` of every function or method longer than ``limit`` under ``top``."""
    found = []
    for path in sorted(top.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(top.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


@pytest.mark.parametrize("package", ["edge", "trainer"])
def test_no_function_over_the_limit(package: str) -> None:
    assert long_functions(ROOT / package) == []


def test_the_check_can_fail(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(LIMIT))
    (pkg / "m.py").write_text(f"def short():\n    return 1\n\n\nclass C:\n    def long(self):\n{body}", encoding="utf-8")
    assert long_functions(pkg) == [f"pkg/m.py:6 long ({LIMIT + 1} lines)"]
