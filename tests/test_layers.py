"""The layers of ``edge/`` (docs/architecture.md), checked on the source with :mod:`ast`.

Three rules, each failure naming the module and the import at fault:

1. **The daemon never imports the tools or the commands.** Nothing in the daemon's
   packages (``edge/__init__.py``, ``edge/ingest``, ``edge/egress``, ``edge/inference``,
   ``edge/ops``, ``edge/scheduler.py``, ``edge/daemon.py``, ``edge/config.py``,
   ``edge/types.py``, ``edge/errors.py``, ``edge/fileio.py``) imports ``edge.tools`` or
   ``edge.commands``, at module level or inside a function.
2. **``edge/`` never imports the trainer, torch or onnx**, anywhere (``onnxruntime`` is
   the daemon's reference backend and is allowed). The trainer's subcommands reach
   ``medge`` through the ``medge.commands`` entry-point group (edge/cli.py), so no
   exception is needed for edge/commands.
3. **No import cycle in ``edge/``** among module-level imports (those run when the
   module is imported; imports inside functions and under ``if TYPE_CHECKING:`` do not).

Static, so it also sees imports on code paths no test runs; the runtime side
(importing every module with torch/onnx/trainer blocked) is
``tests/edge/test_core_imports.py``. Literal ``importlib.import_module("...")`` and
``__import__("...")`` calls count as imports. ``from pkg import name`` is an import of
``pkg.name`` where that is a module, else of ``pkg``; a package's ``__init__`` importing
its own submodules is not treated as a cycle with them (Python has the package in
``sys.modules`` by then).

Every rule is also run on small synthetic packages with a planted violation, so a
checker that silently finds nothing fails here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The daemon's modules and packages (names relative to the top package; "" is its __init__).
DAEMON_PARTS = ("", "ingest", "egress", "inference", "ops", "scheduler", "daemon", "config", "types", "errors", "fileio")
#: What the daemon must never import (relative to the top package).
DAEMON_FORBIDDEN = ("tools", "commands")
#: Top-level names nothing in edge/ may import.
FORBIDDEN_EVERYWHERE = ("trainer", "torch", "onnx", "onnxscript")


@dataclass(frozen=True)
class Import:
    """One import statement (or literal dynamic import) found in a module."""

    importer: str
    target: str
    lineno: int
    module_level: bool

    def __str__(self) -> str:
        where = "module level" if self.module_level else "inside a function"
        return f"{self.importer} imports {self.target} (line {self.lineno}, {where})"


def discover(top: Path) -> dict[str, Path]:
    """Every module under package folder ``top``: dotted name -> file."""
    mods: dict[str, Path] = {}
    for path in sorted(top.rglob("*.py")):
        rel = path.relative_to(top.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, known: set[str]) -> None:
        self.name = name
        self.package = name if is_package else name.rpartition(".")[0]
        self.known = known
        self.depth = 0  # > 0: inside a function or a TYPE_CHECKING block (not run at import)
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.AST) -> None:
        self.found.append(Import(self.name, target, node.lineno, self.depth == 0))

    def _resolve(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = self.package.split(".")
        base = base[: len(base) - (level - 1)] if level > 1 else base
        return ".".join([*base, module] if module else base)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve(node.module, node.level)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        dynamic = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
            isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
        )
        if dynamic and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, node)
        self.generic_visit(node)

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self.depth -= 1
        for stmt in node.orelse:
            self.visit(stmt)


def collect_imports(top: Path) -> list[Import]:
    """Every import in package folder ``top``, with relative imports resolved."""
    mods = discover(top)
    known = set(mods)
    found: list[Import] = []
    for name, path in mods.items():
        c = _Collector(name, path.name == "__init__.py", known)
        c.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.extend(c.found)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def daemon_imports_of_tools(top: Path) -> list[str]:
    """Rule 1: imports of ``<top>.tools`` / ``<top>.commands`` from the daemon's modules."""
    pkg = top.name
    daemon = [f"{pkg}.{p}" if p else pkg for p in DAEMON_PARTS]
    forbidden = [f"{pkg}.{p}" for p in DAEMON_FORBIDDEN]

    def is_daemon(mod: str) -> bool:
        return mod == pkg or any(_within(mod, d) for d in daemon[1:])

    return [
        str(i) for i in collect_imports(top) if is_daemon(i.importer) and any(_within(i.target, f) for f in forbidden)
    ]


def forbidden_imports(top: Path) -> list[str]:
    """Rule 2: imports of the trainer, torch or onnx anywhere under ``top``."""
    return [str(i) for i in collect_imports(top) if i.target.split(".")[0] in FORBIDDEN_EVERYWHERE]


def import_cycles(top: Path) -> list[str]:
    """Rule 3: one concrete cycle per strongly connected component of module-level imports."""
    pkg = top.name
    graph: dict[str, dict[str, int]] = {m: {} for m in discover(top)}
    for i in collect_imports(top):
        if not i.module_level or i.importer == i.target or not _within(i.target, pkg):
            continue
        target = i.target
        while target not in graph and "." in target:  # `import edge.x.Name`-style: the module that exists
            target = target.rpartition(".")[0]
        if _within(i.importer, target) and i.importer != target:
            continue  # a module importing its own parent package: the package is initialised already
        if target in graph and target != i.importer:
            graph[i.importer].setdefault(target, i.lineno)

    # Tarjan's strongly connected components (iterative: deep packages must not hit the recursion limit).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    sccs.append(sorted(comp))

    cycles = []
    for comp in sccs:
        members = set(comp)
        first = comp[0]
        # Shortest path from first back to itself inside the component (BFS).
        prev: dict[str, str] = {}
        frontier = [first]
        seen = {first}
        end = None
        while frontier and end is None:
            nxt = []
            for a in frontier:
                for b in sorted(graph[a]):
                    if b == first:
                        end = a
                        break
                    if b in members and b not in seen:
                        seen.add(b)
                        prev[b] = a
                        nxt.append(b)
                if end is not None:
                    break
            frontier = nxt
        assert end is not None
        path = [end]
        while path[-1] != first:
            path.append(prev[path[-1]])
        path.reverse()
        hops = [f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:] + [first])]
        cycles.append(" -> ".join(hops + [first]) + f"  [component: {', '.join(comp)}]")
    return cycles


# ------------------------------------------------------------------ the real tree
EDGE = ROOT / "edge"


def test_checker_sees_the_real_tree() -> None:
    """Guards against a vacuous pass: the walker finds the modules and a known import."""
    mods = discover(EDGE)
    assert len(mods) >= 40 and "edge.daemon" in mods and "edge.ingest.dicom.scp" in mods
    edges = {(i.importer, i.target) for i in collect_imports(EDGE) if i.module_level}
    assert ("edge.daemon", "edge.scheduler") in edges


def test_daemon_never_imports_tools_or_commands() -> None:
    bad = daemon_imports_of_tools(EDGE)
    assert not bad, "the daemon must not import edge.tools or edge.commands:\n" + "\n".join(bad)


def test_edge_never_imports_trainer_torch_or_onnx() -> None:
    bad = forbidden_imports(EDGE)
    assert not bad, "edge/ must not import trainer, torch or onnx:\n" + "\n".join(bad)


def test_no_import_cycles_in_edge() -> None:
    cycles = import_cycles(EDGE)
    assert not cycles, "import cycles in edge/ (module-level imports):\n" + "\n".join(cycles)


# ------------------------------------------------------------------ each rule can fail
CASES = {
    "daemon imports tools at module level": (
        daemon_imports_of_tools,
        {"ingest/zmq.py": "import edge.tools.synthetic\n", "tools/synthetic.py": ""},
        ["edge.ingest.zmq imports edge.tools.synthetic (line 1, module level)"],
    ),
    "daemon imports commands inside a function": (
        daemon_imports_of_tools,
        {"scheduler.py": "def f():\n    from edge.commands import serve\n", "commands/serve.py": ""},
        ["edge.scheduler imports edge.commands.serve (line 2, inside a function)"],
    ),
    "daemon package __init__ imports tools, relative": (
        daemon_imports_of_tools,
        {"ops/__init__.py": "from ..tools import plots\n", "tools/plots.py": ""},
        ["edge.ops imports edge.tools.plots (line 1, module level)"],
    ),
    "deep relative import from the daemon": (
        daemon_imports_of_tools,
        {"ingest/dicom/scp.py": "from ...tools.dicom_scu import send\n", "tools/dicom_scu.py": ""},
        ["edge.ingest.dicom.scp imports edge.tools.dicom_scu (line 1, module level)"],
    ),
    "literal import_module from the daemon": (
        daemon_imports_of_tools,
        {"fileio.py": "import importlib\ndef f():\n    importlib.import_module('edge.tools.x')\n"},
        ["edge.fileio imports edge.tools.x (line 3, inside a function)"],
    ),
    "edge/__init__ imports commands": (
        daemon_imports_of_tools,
        {"__init__.py": "from edge.commands import demo\n"},
        ["edge imports edge.commands (line 1, module level)"],
    ),
    "tools and commands may import each other": (
        daemon_imports_of_tools,
        {"commands/bench.py": "from edge.tools import bench\n", "tools/bench.py": "import edge.commands\n"},
        [],
    ),
    "torch inside a function": (
        forbidden_imports,
        {"cli.py": "def train():\n    import torch.nn as nn\n"},
        ["edge.cli imports torch.nn (line 2, inside a function)"],
    ),
    "onnx from commands, trainer from tools": (
        forbidden_imports,
        {"commands/export.py": "from onnx import helper\n", "tools/t.py": "from trainer.train import train\n"},
        ["edge.commands.export imports onnx (line 1, module level)", "edge.tools.t imports trainer.train (line 1, module level)"],
    ),
    "onnxruntime is allowed": (
        forbidden_imports,
        {"inference/backends/onnxruntime.py": "import onnxruntime as ort\nfrom onnxruntime import InferenceSession\n"},
        [],
    ),
    "two-module cycle, relative": (
        import_cycles,
        {"a.py": "from . import b\n", "b.py": "\n\nfrom .a import thing\n"},
        ["edge.a (line 1) -> edge.b (line 3) -> edge.a"],
    ),
    "three-module cycle across packages": (
        import_cycles,
        {
            "ingest/x.py": "from edge.egress.y import Y\n",
            "egress/y.py": "import edge.ops.z\n",
            "ops/z.py": "try:\n    from edge.ingest import x\nexcept ImportError:\n    pass\n",
        },
        ["edge.egress.y (line 1) -> edge.ops.z (line 2) -> edge.ingest.x (line 1) -> edge.egress.y"],
    ),
    "function-level and TYPE_CHECKING imports are no cycle": (
        import_cycles,
        {
            "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edge.b import B\n",
            "b.py": "import edge.a\ndef f():\n    from edge.c import C\n",
            "c.py": "from edge import b\n",
            "pkg/__init__.py": "from edge.pkg.sub import S\n",
            "pkg/sub.py": "from edge.pkg import other, NAME\n",
            "pkg/other.py": "",
        },
        [],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rule_can_fail(case: str, tmp_path: Path) -> None:
    check, files, expected = CASES[case]
    top = tmp_path / "edge"
    for rel, text in {"__init__.py": "", **files}.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        init = path.parent / "__init__.py"
        if not init.exists():
            init.write_text("")
        path.write_text(text)
    found = check(top)
    assert len(found) == len(expected), found
    for want, got in zip(expected, sorted(found)):
        assert got.startswith(want), (got, want)
