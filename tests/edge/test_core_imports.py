"""A daemon-only install: edge/ imports, and edge's tests run, without torch, onnx or the trainer.

The runtime half of the layer rules (the static half, on the source, is
``tests/test_layers.py``): every ``edge`` module is imported in a child process
whose import system refuses torch, onnx, onnxscript and trainer, and the daemon's
modules, imported first, must not pull in ``edge.tools`` or ``edge.commands``.
The edge tests themselves must need no onnx either: ``fixture_engines`` copies
the committed ``tests/data/fixture-engines/`` instead of building models.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib, pathlib, sys

    BLOCKED = ("torch", "onnx", "onnxscript", "trainer")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import torch  # the blocker itself must work, or this test proves nothing
    except ImportError:
        pass
    else:
        print("0 blocker-broken"); sys.exit(1)
    import edge
    failed = []
    # From the files, not pkgutil.walk_packages: that imports every package it walks (tools included).
    top = pathlib.Path(edge.__file__).parent
    names = sorted(
        ".".join(p.relative_to(top.parent).with_suffix("").parts[: -1 if p.name == "__init__.py" else None])
        for p in top.rglob("*.py")
    )
    # The daemon first (as `medge serve` loads it): it must not load the tools or the commands.
    DAEMON = ("edge.ingest", "edge.egress", "edge.inference", "edge.ops", "edge.scheduler", "edge.daemon",
              "edge.config", "edge.types", "edge.errors", "edge.fileio")
    for name in names:
        if any(name == d or name.startswith(d + ".") for d in DAEMON):
            importlib.import_module(name)
            tools = sorted(m for m in sys.modules if m.startswith(("edge.tools", "edge.commands")))
            if tools:
                print("0 daemon-loaded-tools:", name, "loaded", tools); sys.exit(1)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed.append(f"{name}: {exc}")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(len(names), "modules")
    if failed or leaked:
        print("FAILED", failed, leaked)
        sys.exit(1)
    """
)


def test_edge_imports_without_torch_onnx_or_trainer() -> None:
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert int(p.stdout.split()[0]) >= 5


#: Tests that need ``fixture_engines`` (the backend, the model registry, the scheduler).
FIXTURE_TESTS = (
    "test_onnxruntime_backend_infers_batches",
    "test_segmentation_mask_at_input_size_and_correct",
    "test_detection_boxes_in_input_coordinates",
    "test_live_stream_backlog_sheds_oldest_and_counts_it",
)

RUN_WITHOUT_ONNX = textwrap.dedent(
    """
    import sys

    BLOCKED = ("torch", "onnx", "onnxscript", "trainer")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: a daemon-only install)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import pytest
    rc = pytest.main(sys.argv[1:])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("LEAKED", leaked)
    sys.exit(rc or bool(leaked))
    """
)


def test_edge_tests_run_without_onnx() -> None:
    """Every edge test module collects, and fixture-engine tests pass, with onnx unimportable."""
    args = ["-q", "-rs", "-p", "no:cacheprovider", "tests/edge", "-k", " or ".join(FIXTURE_TESTS)]
    p = subprocess.run([sys.executable, "-c", RUN_WITHOUT_ONNX, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert f"{len(FIXTURE_TESTS)} passed" in out, out
    assert "skipped" not in out.lower(), out  # e.g. an importorskip("onnx") left in a fixture
    assert "LEAKED []" in out, out
