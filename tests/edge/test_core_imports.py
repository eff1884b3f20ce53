"""The daemon core imports without torch, onnx or the trainer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

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
    names = ["edge"] + [m.name for m in pkgutil.walk_packages(edge.__path__, "edge.")]
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
