"""INT8 Q/DQ: format, calibration from training data, and the accuracy gate refusing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from edge.cli import main as medge  # noqa: E402
from edge.errors import DataError  # noqa: E402
from edge.inference.manifest import Manifest  # noqa: E402
from trainer.export import export_checkpoint  # noqa: E402
from trainer.quantize import GateRefused, quantize_engine, quantize_int8, quantize_with_gate  # noqa: E402


@pytest.fixture(scope="module")
def det_engine(tmp_path_factory: pytest.TempPathFactory, det_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("det-engine")
    export_checkpoint(det_checkpoint, out, "tiny-det", fp16=False, heldout_n=3, val_n=3)
    return out


def _zero_points(path: Path) -> list[np.ndarray]:
    m = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]


@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_qdq_format(tmp_path: Path, det_engine: Path, act: str) -> None:
    calib = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    out = quantize_int8(det_engine / "model.onnx", tmp_path / "q.onnx", calib, activation_type=act)
    m = onnx.load(str(out))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # explicit Q/DQ around float ops
    zps = _zero_points(out)
    assert zps and all(z.dtype == (np.int8 if act == "int8" else np.uint8) for z in zps)
    if act == "int8":
        assert all(int(np.abs(z).max()) == 0 for z in zps)  # symmetric: zero point 0 (TensorRT)
    inits = {i.name: i for i in m.graph.initializer}
    w = [inits[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert w and all(t.data_type == onnx.TensorProto.INT8 for t in w)
    scales = [inits[n.input[1]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)  # per-channel


def test_zero_size_calibration_set_is_a_clear_error(tmp_path: Path, det_engine: Path) -> None:
    with pytest.raises(DataError, match="size zero"):
        quantize_int8(det_engine / "model.onnx", tmp_path / "q.onnx", np.zeros((0, 1, 64, 64), np.float32))
    with pytest.raises(DataError, match="size 0"):
        quantize_engine(det_engine, calib_n=0)
    assert not (tmp_path / "q.onnx").exists()


def test_gate_refuses_and_writes_nothing(tmp_path: Path, det_engine: Path) -> None:
    calib = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    target = tmp_path / "int8.onnx"
    scores = iter([0.9, 0.5])  # FP32, then INT8: a 0.4 drop
    with pytest.raises(GateRefused, match=r"0\.4000 below FP32 .* refusing to write"):
        quantize_with_gate(det_engine / "model.onnx", target, calib, lambda p: next(scores), "map50", 0.02)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_cli_gate_refuses_broken_calibration(det_engine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A deliberately broken calibration (one sample, absurd threshold) is refused: exit 3, no artifact."""
    before = (det_engine / "manifest.json").read_bytes()
    rc = medge(["quantize", str(det_engine), "--calib-n", "1", "--max-map-drop", "-1", "--heldout-n", "3"])
    assert rc == 3
    assert "refused" in capsys.readouterr().err
    assert not (det_engine / "model.int8.onnx").exists()
    assert (det_engine / "manifest.json").read_bytes() == before


def test_quantize_engine_updates_manifest(tmp_path: Path, det_engine: Path) -> None:
    import shutil

    eng = tmp_path / "e"
    shutil.copytree(det_engine, eng)
    r = quantize_engine(eng, calib_n=2, max_drop=1.0, heldout_n=3)
    man = Manifest.load(eng)
    assert man.artifact_path("int8", verify=True).name == "model.int8.onnx"
    assert "map50" in man.metrics["int8"]
    q = man.training["quantization"]
    assert q["calibration"]["n"] == 2 and "training data" in q["calibration"]["source"]
    assert q["gate"]["max_drop"] == 1.0 and r.passed
    assert q["reduce_range"]["enabled"] is True and "7-bit" in q["weights"] and "VNNI" in q["reduce_range"]["why"]
    gate = q["gate"]  # served on the daemon's session, checked against the Q/DQ reference arithmetic
    assert r.reference is not None and gate["reference"] == r.reference and gate["divergence"] == r.divergence
    assert "daemon" in gate["runtime"] and "reference" in gate["reference_runtime"] and "vnni" in gate["cpu"]


def test_quantize_engine_reduce_range_off_is_recorded(tmp_path: Path, det_engine: Path) -> None:
    import shutil

    eng = tmp_path / "e"
    shutil.copytree(det_engine, eng)
    quantize_engine(eng, calib_n=2, max_drop=1.0, heldout_n=3, reduce_range=False)
    q = Manifest.load(eng).training["quantization"]
    assert q["reduce_range"]["enabled"] is False and "7-bit" not in q["weights"]


def test_gate_refuses_when_fused_kernels_and_reference_disagree(tmp_path: Path, det_engine: Path) -> None:
    """Both drops within the threshold, but the served score is 0.02 from the reference: saturation, refused."""
    calib = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    target = tmp_path / "int8.onnx"
    scores = iter([0.93, 0.94])  # FP32, then INT8 on the fused kernels
    with pytest.raises(GateRefused, match=r"fused kernels \(0\.9400\) differs from the Q/DQ reference .* saturating"):
        quantize_with_gate(det_engine / "model.onnx", target, calib, lambda p: next(scores), "dice", 0.015,
                           reference_score=lambda p: 0.92)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_gate_refuses_a_reference_drop_and_passes_agreement() -> None:
    from trainer.quantize import GateResult

    bad_reference = GateResult("dice", fp32=0.93, int8=0.93, max_drop=0.01, reference=0.919)
    assert bad_reference.drop == 0 and not bad_reference.passed  # 0.011 below on the reference arithmetic
    ok = GateResult("dice", fp32=0.93, int8=0.928, max_drop=0.01, reference=0.931)
    assert ok.passed and ok.divergence == pytest.approx(0.003) and ok.reference_drop == pytest.approx(-0.001)
    saturated = GateResult("dice", fp32=0.9333, int8=0.542, max_drop=0.01, reference=0.9277)
    assert not saturated.passed and saturated.divergence == pytest.approx(0.3857)


def test_cli_no_reduce_range_option() -> None:
    import argparse

    from trainer.cli_quantize import configure_parser

    p = argparse.ArgumentParser()
    configure_parser(p)
    assert p.parse_args(["e"]).reduce_range is None  # quantize_engine's default: 7-bit for uint8
    assert p.parse_args(["e", "--no-reduce-range"]).reduce_range is False


def test_build_refuses_tensorrt_int8_from_uint8_activations(tmp_path) -> None:
    import dataclasses
    import shutil

    from edge.errors import EngineBuildError
    from edge.inference.manifest import INT8_TENSORRT, Manifest, default_engines_dir
    from trainer.build import build

    eng = tmp_path / "us-lesion-seg"
    shutil.copytree(default_engines_dir() / "us-lesion-seg", eng)
    man = Manifest.load(eng)
    arts = {k: v for k, v in man.artifacts.items() if k != INT8_TENSORRT}
    dataclasses.replace(man, artifacts=arts).save(eng)
    with pytest.raises(EngineBuildError, match="--activations int8"):
        build(str(eng), "int8", max_batch=1, cache_dir="/nonexistent")


def test_bundled_engines_carry_a_tensorrt_int8_artifact() -> None:
    """Symmetric int8 activations (int8 zero points, all 0), gated like the CPU int8."""
    import onnx
    from onnx import numpy_helper

    from edge.inference.manifest import INT8_TENSORRT, Manifest, default_engines_dir

    for name in ("us-lesion-seg", "xray-nodule-det"):
        man = Manifest.load(default_engines_dir() / name)
        assert man.int8_tensorrt_ready and man.artifact_key("int8", "tensorrt") == INT8_TENSORRT
        assert man.artifact_key("int8", "onnxruntime") == "int8"
        gate = man.training["quantization_tensorrt"]["gate"]
        assert gate["drop"] <= gate["max_drop"]
        cpu = man.training["quantization"]["gate"]  # served (fused) and reference scores both gated and agreeing
        assert max(cpu["drop"], cpu["reference_drop"], cpu["divergence"]) <= cpu["max_drop"]
        model = onnx.load(str(man.artifact_path(INT8_TENSORRT, verify=True)))
        inits = {i.name: i for i in model.graph.initializer}
        zps = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
               if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        assert zps and all(z.dtype.name == "int8" and not z.any() for z in zps)
