"""`python -m trainer.reproduce --quick`: the whole pipeline end to end (tiny, plumbing only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from edge.inference.manifest import discover  # noqa: E402
from trainer.reproduce import main  # noqa: E402


def test_quick_reproduce_builds_every_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engines"
    rc = main(["--out", str(out), "--quick", "--no-progress", "--results", str(tmp_path / "r.json")])
    assert rc == 0
    found = discover(out)
    assert set(found) == {"us-lesion-seg", "xray-nodule-det", "xray-nodule-cls"}
    assert found["xray-nodule-cls"].training["init_task"] == "detection"  # the encoder of the detector just built
    for m in found.values():
        assert set(m.artifacts) == {"fp32", "fp16", "int8", "int8-tensorrt"}
        for prec in m.artifacts:
            m.artifact_path(prec, verify=True)
        assert set(m.metrics) == {"fp32", "fp16", "int8", "int8-tensorrt"}
        assert m.training["quantization"]["gate"]["max_drop"] == 1.0
        assert (m.directory / "model.pt").is_file()
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["quick"] and {x["name"] for x in rec["models"]} == set(found)
    assert all(x["seconds"]["train"] >= 0 for x in rec["models"])
