"""Backends: the ONNX Runtime reference, and TensorRT's cache keys (GPU parts skip without a GPU)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.errors import BackendUnavailableError, ModelError
from edge.inference.backends import create_backend, resolve_backend
from edge.inference.backends.onnxruntime import OnnxRuntimeBackend
from edge.inference.backends.tensorrt import (
    EngineKey,
    engine_cache_key,
    engine_cache_path,
    tensorrt_available,
)
from edge.types import Backend


def test_onnxruntime_backend_infers_batches(fixture_engines: Path) -> None:
    with OnnxRuntimeBackend(fixture_engines / "tiny-seg" / "model.onnx", max_batch=4, intra_op_threads=1) as be:
        assert isinstance(be, Backend)
        assert be.name == "onnxruntime" and be.providers[0] == "CPUExecutionProvider"
        x = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
        out = be.infer(x)
        assert set(out) == {"logits"} and out["logits"].shape == (3, 1, 64, 64)
        np.testing.assert_allclose(out["logits"], 20 * (x - 0.5), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="max_batch"):
            be.infer(np.zeros((5, 1, 64, 64), np.float32))


def test_onnxruntime_backend_refuses_garbage_and_fp16_on_cpu(tmp_path: Path, fixture_engines: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        OnnxRuntimeBackend(bad)
    with pytest.raises(BackendUnavailableError, match="fp16"):
        OnnxRuntimeBackend(fixture_engines / "tiny-seg" / "model.onnx", precision="fp16")


def test_resolve_backend() -> None:
    assert resolve_backend("onnxruntime", "cpu") == ("onnxruntime", "cpu", "")
    with pytest.raises(BackendUnavailableError, match="Unknown backend"):
        resolve_backend("openvino")
    if not tensorrt_available()[0]:
        kind, provider, why = resolve_backend("auto", "cpu")
        assert (kind, provider) == ("onnxruntime", "cpu") and "tensorrt unavailable" in why
        with pytest.raises(BackendUnavailableError):
            resolve_backend("tensorrt")
    with pytest.raises(BackendUnavailableError, match="concrete"):
        create_backend(
            "auto", onnx_path="x", onnx_sha256="", model_name="m", precision="fp32", input_name="image",
            input_chw=(1, 8, 8), max_batch=1, cache_dir=".",
        )


KEY = EngineKey(
    gpu_name="NVIDIA RTX A6000",
    compute_capability=(8, 6),
    trt_version="10.3.0",
    precision="fp16",
    onnx_sha256="ab" * 32,
    max_batch=8,
)


def test_engine_cache_key_changes_with_every_input() -> None:
    base = KEY.digest()
    assert base == engine_cache_key(**dataclasses.asdict(KEY)) and len(base) == 64
    variants = {
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": (9, 0),
        "trt_version": "10.4.0",
        "precision": "int8",
        "onnx_sha256": "cd" * 32,
        "max_batch": 4,
    }
    digests = {dataclasses.replace(KEY, **{k: v}).digest() for k, v in variants.items()}
    assert base not in digests and len(digests) == len(variants)
    # cosmetic differences do not change the key
    assert dataclasses.replace(KEY, gpu_name=" NVIDIA RTX A6000 ", onnx_sha256=("AB" * 32)).digest() == base


def test_engine_cache_path(tmp_path: Path) -> None:
    p = engine_cache_path(tmp_path, "us-lesion-seg", KEY)
    assert p.parent == tmp_path
    assert p.name == f"us-lesion-seg-fp16-sm86-{KEY.digest()[:16]}.plan"


def test_tensorrt_module_imports_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes "import tensorrt" fail
    mod = importlib.reload(importlib.import_module("edge.inference.backends.tensorrt"))
    ok, why = mod.tensorrt_available()
    assert not ok and "TensorRT is not installed" in why
    with pytest.raises(BackendUnavailableError):
        mod.TensorRTBackend(
            "x.onnx", onnx_sha256="0" * 64, model_name="m", precision="fp16", input_name="image",
            input_chw=(1, 64, 64), max_batch=1, cache_dir=".",
        )


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available()[0], reason=f"TensorRT not usable here: {tensorrt_available()[1]}")
def test_tensorrt_matches_onnxruntime(fixture_engines: Path, tmp_path: Path) -> None:  # pragma: no cover - GPU only
    from edge.inference.backends.tensorrt import TensorRTBackend
    from edge.inference.manifest import Manifest

    m = Manifest.load(fixture_engines / "tiny-seg")
    onnx_path = m.artifact_path("fp32")
    x = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    with OnnxRuntimeBackend(onnx_path) as ref:
        expected = ref.infer(x)["logits"]
    kw = dict(onnx_sha256=m.artifacts["fp32"].sha256, model_name=m.name, precision="fp32", input_name="image",
              input_chw=(1, 64, 64), max_batch=4, cache_dir=tmp_path)
    with TensorRTBackend(onnx_path, **kw) as be:
        got = be.infer(x)["logits"]
        assert set(be.last_timings_ms) == {"h2d", "compute", "d2h"}
        plan = be.plan_path
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert plan.is_file()
    with TensorRTBackend(onnx_path, **kw) as again:  # second load uses the cache
        assert again.plan_path == plan


def test_onnxruntime_spin_is_bounded_and_configurable(fixture_engines: Path) -> None:
    """spin_us reaches the session as a bounded spin that stops when a run returns; 0 turns spinning off."""
    path = fixture_engines / "tiny-seg" / "model.onnx"
    on = OnnxRuntimeBackend(path, spin_us=250)
    opts = on._session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.get_session_config_entry("session.intra_op.spin_duration_us") == "250"
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"  # within a run, not after it
    off = OnnxRuntimeBackend(path, spin_us=0)
    assert off._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
