"""``medge demo``: a short run writes a complete report with ok frames and no errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from edge.cli import main
from edge.inference.manifest import default_engines_dir


def _check_report(report: Path) -> dict:
    for name in ("overlay_segmentation.png", "overlay_detection.png", "latency.png"):
        with Image.open(report / name) as im:
            im.verify()
        with Image.open(report / name) as im:
            assert im.format == "PNG" and min(im.size) >= 64
    summary = json.loads((report / "summary.json").read_text())
    assert summary["frames"]["ok"] > 0
    assert summary["frames"]["errors"] == 0 and summary["frames"]["timeouts"] == 0
    assert summary["aborted"] is None
    assert summary["daemon"]["exit_status"] == 0
    assert summary["latency_ms"]["median_ms"] > 0
    md = (report / "report.md").read_text()
    assert "latency.png" in md and "overlay_segmentation.png" in md
    return summary


def test_demo_on_fixture_models(fixture_engines: Path, tmp_path: Path, capsys) -> None:
    report = tmp_path / "report"
    rc = main(["demo", "--duration-s", "3", "--fps", "30", "--engines-dir", str(fixture_engines),
               "--seg-model", "tiny-seg", "--det-model", "tiny-det", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = _check_report(report)
    assert summary["frames"]["ok"] >= 60  # 3 s at 30 fps, plus the X-ray stream
    assert "p50_ms" in out  # the live table
    d = summary["dicom"]
    if d["status"] == "ran":  # the DICOM side is part of this build: results must come back
        assert d["stored"] == d["sent"] and d["instances_without_result"] == 0


@pytest.mark.skipif(not (default_engines_dir() / "us-lesion-seg" / "manifest.json").is_file()
                    or not (default_engines_dir() / "xray-nodule-det" / "manifest.json").is_file(),
                    reason="bundled engines not built (make engines)")
def test_demo_on_bundled_models_without_dicom(tmp_path: Path, capsys) -> None:
    """What `make demo` runs, shortened."""
    report = tmp_path / "report"
    rc = main(["demo", "--duration-s", "3", "--no-dicom", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = _check_report(report)
    assert summary["models"] == {"segmentation": "us-lesion-seg", "detection": "xray-nodule-det"}
    assert summary["dicom"]["status"].startswith("skipped")
