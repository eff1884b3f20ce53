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


def _load(name: str):
    import importlib

    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_native_sizes_share_and_targets_from_samples() -> None:
    """The daemon's share is daemon - floor at p50; each target line passes or fails on its own number."""
    import numpy as np

    ns = _load("native_sizes")
    img = np.zeros((4, 4), np.uint8)
    fast = ns.Case("m", "segmentation", "256x256 float32 (model size)", img, img[None, None], native=False)
    fast.samples = {"raw": [10.0] * 99 + [11.0], "daemon": [10.5] * 99 + [12.0], "floor": [10.3] * 100}
    slow = ns.Case("m", "segmentation", "480x640 uint8 (native)", img, img[None, None], native=True)
    slow.samples = {"raw": [10.0] * 100, "daemon": [11.5] * 99 + [20.0], "floor": [10.4] * 100, "triton": [16.0] * 100}
    rows = [ns.summarise(fast), ns.summarise(slow)]
    assert rows[0]["daemon_share_over_floor_p50_ms"] == pytest.approx(0.2)
    assert rows[1]["overhead_over_raw_ms"]["triton"]["p50_ms"] == pytest.approx(6.0)
    lines = ns.verdicts(rows)
    assert [ok for _, ok in lines] == [True, True, False, True]  # share 0.2; p99 0.5; native p50 1.5 > 1.0; p99 1.6
    assert "share" in lines[0][0] and "p50 <= 1.0" in lines[2][0]


def test_triton_venv_is_found_only_where_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tp = _load("triton_peer")
    monkeypatch.setenv("MEDGE_TRITON_VENV", str(tmp_path / "nowhere"))
    assert tp.venv_python() is None
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")
    monkeypatch.setenv("MEDGE_TRITON_VENV", str(tmp_path / "venv"))
    assert tp.venv_python() == tmp_path / "venv" / "bin" / "python"


def test_default_stream_reads_models_and_judges_each_target() -> None:
    """Served models come from medge_model_info; a drop, a fat process or a bad exit each fail their line."""
    ds = _load("default_stream")
    page = (
        '# HELP medge_model_info x\nmedge_model_info{backend="onnxruntime",fallback="",model="a",precision="int8",'
        'version="1"} 1.0\nmedge_model_info{backend="onnxruntime",fallback="",model="b",precision="fp32",'
        'version="2"} 1.0\nmedge_ready 1.0\n'
    )
    models = ds.served_models(page)
    assert [(m["model"], m["precision"]) for m in models] == [("a", "int8"), ("b", "fp32")]
    live = {"seconds": 60.0, "dropped": 0, "errors": 0, "unanswered": 0}
    good = {"stream_30fps": live, "rss_peak_bytes": 250 * 2**20, "models": models, "shutdown": {"exit_code": 0}}
    assert [ok for _, ok in ds.verdicts(good)] == [True, True, True]
    bad = dict(good, stream_30fps=dict(live, dropped=1), rss_peak_bytes=301 * 2**20, shutdown={"exit_code": 1})
    assert [ok for _, ok in ds.verdicts(bad)] == [False, False, False]


@pytest.mark.parametrize("name", ["us-lesion-seg", "xray-nodule-det"])
def test_in_graph_preprocessing_matches_the_daemons_path(name: str) -> None:
    """The graph the in-graph benchmark times computes what the daemon computes (else its timing compares nothing)."""
    pytest.importorskip("onnx", reason="the trainer extra builds the graphs")
    ig = _load("in_graph_preprocessing")
    row = ig.compare(name, "fp32", frames=2, rounds=1, block=1)
    assert row["source"] == {"us-lesion-seg": "480x640 uint8", "xray-nodule-det": "512x512 uint16"}[name]
    assert row["max_abs_output_diff"] < 1e-3  # fp32: float32 rounding, not a different filter
    if name == "us-lesion-seg":
        assert row["mask_agreement_min"] >= 0.9999
    assert row["graph_run_p50_us"] > 0 and row["python_run_p50_us"] > 0
