"""The scripts in benchmarks/ at least start: each compiles and answers --help.

They run for minutes, so the suite does not run them; this catches a script
that a refactoring broke before anyone needs a measurement from it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts() -> None:
    assert {p.name for p in SCRIPTS} >= {"run_all.py", "daemon_overhead.py", "engine_vs_raw.py", "dicom_ingest.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
