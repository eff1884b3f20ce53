"""The ``auto`` fallback chain: which steps a configuration allows, and how failures move it on.

Most tests inject fake backends (``open_step``) and a fake availability check,
so every step can be made to fail with every error type; the last ones run the
chain through ``load_model`` with the real (CPU) ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edge.errors import BackendUnavailableError, EngineBuildError, ModelError
from edge.inference import backends
from edge.inference.backends.onnxruntime import ProviderInactiveError
from edge.inference.chain import Selection, Step, plan, select
from edge.inference.manifest import INT8_TENSORRT, Manifest
from edge.inference.model import load_model

FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx", INT8_TENSORRT: "model.int8-tensorrt.onnx"}


def _manifest(folder: Path, fixture_engines: Path, keys: tuple[str, ...] = tuple(FILES)) -> Manifest:
    """tiny-seg's manifest with the artifacts ``keys`` (stand-in files; fakes never read them)."""
    data = json.loads((fixture_engines / "tiny-seg" / "manifest.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    arts = {}
    for key in keys:
        body = f"artifact {key}".encode()
        (folder / FILES[key]).write_bytes(body)
        arts[key] = {"path": FILES[key], "sha256": hashlib.sha256(body).hexdigest()}
    data["artifacts"] = arts
    data["training"] = {"quantization": {"format": "QDQ", "activations": "uint8 asymmetric"}}  # CPU-only int8
    (folder / "manifest.json").write_text(json.dumps(data))
    return Manifest.load(folder)


class FakeBackend:
    name = "fake"
    max_batch = 4

    def __init__(self, step: Step, path: Path) -> None:
        self.step, self.path, self.precision = step, path, step.precision

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": batch}

    def close(self) -> None:
        pass


def _opener(fail: Callable[[Step], BaseException | None], opened: list[str]) -> Callable[[Step, Path], FakeBackend]:
    def open_step(step: Step, path: Path) -> FakeBackend:
        opened.append(str(step))
        exc = fail(step)
        if exc is not None:
            raise exc
        return FakeBackend(step, path)

    return open_step


def _artifact_file(sel: Selection) -> str:
    """The file name the fake backend of ``sel`` was opened on."""
    backend = sel.backend
    assert isinstance(backend, FakeBackend)
    return backend.path.name


def _all_available(kind: str, provider: str) -> tuple[bool, str]:
    return True, ""


@pytest.fixture
def manifest(tmp_path: Path, fixture_engines: Path) -> Manifest:
    return _manifest(tmp_path / "m", fixture_engines)


# ----------------------------------------------------------------------------- plan
def test_auto_plan_order_and_artifacts(manifest: Manifest) -> None:
    steps = plan(manifest, "auto", "cpu", "auto")
    assert [(str(s), s.artifact) for s in steps] == [
        ("tensorrt/int8", INT8_TENSORRT),
        ("tensorrt/fp16", "fp16"),
        ("tensorrt/fp32", "fp32"),
        ("onnxruntime+cuda/fp16", "fp16"),
        ("onnxruntime+cuda/fp32", "fp32"),
        ("onnxruntime/int8", "int8"),  # the uint8 CPU artifact, never given to TensorRT
        ("onnxruntime/fp32", "fp32"),
    ]
    with_ep = [(str(s), s.artifact) for s in plan(manifest, "auto", "tensorrt", "auto")]
    assert with_ep[3:6] == [
        ("onnxruntime+tensorrt/int8", INT8_TENSORRT),
        ("onnxruntime+tensorrt/fp16", "fp16"),
        ("onnxruntime+tensorrt/fp32", "fp32"),
    ]
    assert [str(s) for s in plan(manifest, "auto", "cuda", "auto")] == [str(s) for s in steps]


def test_plan_skips_what_the_manifest_lacks(tmp_path: Path, fixture_engines: Path) -> None:
    m = _manifest(tmp_path / "m", fixture_engines, ("fp32", "int8"))  # no fp16, no int8-tensorrt, uint8 int8
    assert [str(s) for s in plan(m, "auto", "cpu", "auto")] == [
        "tensorrt/fp32", "onnxruntime+cuda/fp32", "onnxruntime/int8", "onnxruntime/fp32",
    ]
    with pytest.raises(ModelError, match="no 'fp16' artifact"):
        plan(m, "auto", "cpu", "fp16")
    with pytest.raises(BackendUnavailableError, match="symmetric int8"):
        plan(m, "tensorrt", "cpu", "int8")


def test_explicit_precision_keeps_only_its_steps(manifest: Manifest) -> None:
    assert [str(s) for s in plan(manifest, "auto", "cpu", "fp16")] == ["tensorrt/fp16", "onnxruntime+cuda/fp16"]
    assert [str(s) for s in plan(manifest, "auto", "cpu", "int8")] == ["tensorrt/int8", "onnxruntime/int8"]
    assert [str(s) for s in plan(manifest, "auto", "cpu", "fp32")] == [
        "tensorrt/fp32", "onnxruntime+cuda/fp32", "onnxruntime/fp32",
    ]
    assert [str(s) for s in plan(manifest, "tensorrt", "cpu", "auto")] == ["tensorrt/int8", "tensorrt/fp16", "tensorrt/fp32"]


@pytest.mark.parametrize(
    ("backend", "provider", "precision", "error", "match"),
    [
        ("onnxruntime", "cpu", "fp16", BackendUnavailableError, "fp16 needs a GPU provider"),
        ("onnxruntime", "cuda", "int8", BackendUnavailableError, "CUDA provider has no int8 kernels"),
        ("openvino", "cpu", "auto", BackendUnavailableError, "Unknown backend"),
        ("auto", "rocm", "auto", BackendUnavailableError, "Unknown ONNX Runtime provider"),
        ("auto", "cpu", "bf16", ModelError, "not fp32, int8, fp16 or auto"),
    ],
)
def test_impossible_configurations_are_errors(
    manifest: Manifest, backend: str, provider: str, precision: str, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        plan(manifest, backend, provider, precision)


# ----------------------------------------------------------------------------- select
@pytest.mark.parametrize("error", [BackendUnavailableError, ModelError, EngineBuildError])
def test_each_failed_step_is_logged_and_the_chain_moves_on(
    manifest: Manifest, error: type, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[str] = []
    fail = lambda s: error(f"{s} broke\non two lines") if s.kind == "tensorrt" or s.provider == "cuda" else None  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="edge.inference.chain"):
        sel = select(manifest, backend="auto", provider="cpu", precision="auto",
                     open_step=_opener(fail, opened), available=_all_available)
    assert str(sel.step) == "onnxruntime/int8" and _artifact_file(sel) == "model.int8.onnx"
    failed = ["tensorrt/int8", "tensorrt/fp16", "tensorrt/fp32", "onnxruntime+cuda/fp16", "onnxruntime+cuda/fp32"]
    assert opened == [*failed, "onnxruntime/int8"]
    assert sel.failed_steps == tuple(failed)
    assert sel.fallback.startswith("tensorrt/int8 failed: tensorrt/int8 broke on two lines; tensorrt/fp16 failed")
    messages = [r.getMessage() for r in caplog.records if r.name == "edge.inference.chain"]
    assert len(messages) == len(failed) and all("\n" not in m for m in messages)
    assert all(step in m for step, m in zip(failed, messages))


def test_a_provider_that_does_not_start_skips_its_other_steps(manifest: Manifest) -> None:
    opened: list[str] = []
    fail = lambda s: ProviderInactiveError("no libcudnn") if s.provider == "cuda" else (  # noqa: E731
        EngineBuildError("parser error") if s.kind == "tensorrt" else None)
    sel = select(manifest, backend="auto", provider="cpu", precision="auto",
                 open_step=_opener(fail, opened), available=_all_available)
    assert opened == ["tensorrt/int8", "tensorrt/fp16", "tensorrt/fp32", "onnxruntime+cuda/fp16", "onnxruntime/int8"]
    assert sel.failed_steps == ("tensorrt/int8", "tensorrt/fp16", "tensorrt/fp32", "onnxruntime+cuda")
    assert sel.fallback.endswith("onnxruntime+cuda unavailable: no libcudnn")


def test_an_unavailable_runtime_is_one_failure_and_never_opened(manifest: Manifest) -> None:
    opened: list[str] = []
    available = lambda kind, prov: (prov == "cpu", "no CUDA device is visible")  # noqa: E731
    sel = select(manifest, backend="auto", provider="tensorrt", precision="auto",
                 open_step=_opener(lambda s: None, opened), available=available)
    assert opened == ["onnxruntime/int8"]
    assert sel.failed_steps == ("tensorrt", "onnxruntime+tensorrt", "onnxruntime+cuda")
    assert sel.fallback.startswith("tensorrt unavailable: no CUDA device is visible; onnxruntime+tensorrt unavailable")


def test_first_step_that_starts_wins_without_fallback(manifest: Manifest) -> None:
    sel = select(manifest, backend="auto", provider="cpu", precision="auto",
                 open_step=_opener(lambda s: None, []), available=_all_available)
    assert str(sel.step) == "tensorrt/int8" and _artifact_file(sel) == "model.int8-tensorrt.onnx"
    assert sel.failures == () and sel.fallback == "" and sel.failed_steps == ()


def test_explicit_backend_that_cannot_start_is_a_start_up_error(manifest: Manifest) -> None:
    opened: list[str] = []
    down = lambda kind, prov: (False, "TensorRT is not installed")  # noqa: E731
    with pytest.raises(BackendUnavailableError, match="Backend 'tensorrt' cannot run here: TensorRT is not installed"):
        select(manifest, backend="tensorrt", provider="cpu", precision="auto", open_step=_opener(lambda s: None, opened),
               available=down)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        select(manifest, backend="onnxruntime", provider="cuda", precision="fp32",
               open_step=_opener(lambda s: None, opened), available=down)
    assert opened == []


def test_explicit_step_failure_is_raised_unchanged(manifest: Manifest) -> None:
    fail = lambda s: EngineBuildError("TensorRT failed to build an engine")  # noqa: E731
    with pytest.raises(EngineBuildError, match="failed to build"):
        select(manifest, backend="tensorrt", provider="cpu", precision="int8",
               open_step=_opener(fail, []), available=_all_available)


def test_explicit_backend_with_auto_precision_steps_down(manifest: Manifest) -> None:
    fail = lambda s: BackendUnavailableError("This GPU has no fast INT8") if s.precision == "int8" else None  # noqa: E731
    sel = select(manifest, backend="tensorrt", provider="cpu", precision="auto",
                 open_step=_opener(fail, []), available=_all_available)
    assert str(sel.step) == "tensorrt/fp16" and _artifact_file(sel) == "model.fp16.onnx"
    assert sel.fallback == "tensorrt/int8 failed: This GPU has no fast INT8"


def test_nothing_starts(manifest: Manifest) -> None:
    unavailable = lambda s: BackendUnavailableError(f"{s} cannot run")  # noqa: E731
    with pytest.raises(BackendUnavailableError, match=r"cannot run here \(backend = 'auto'.*onnxruntime/fp32 failed"):
        select(manifest, backend="auto", provider="cpu", precision="auto",
               open_step=_opener(unavailable, []), available=_all_available)
    broken = lambda s: ModelError("bad graph") if s.precision == "fp32" else BackendUnavailableError("no")  # noqa: E731
    with pytest.raises(ModelError) as info:
        select(manifest, backend="auto", provider="cpu", precision="auto",
               open_step=_opener(broken, []), available=_all_available)
    assert type(info.value) is ModelError and "bad graph" in str(info.value)


def test_artifact_integrity_is_never_skipped(manifest: Manifest) -> None:
    assert manifest.directory is not None
    (manifest.directory / "model.int8-tensorrt.onnx").write_bytes(b"tampered")
    opened: list[str] = []
    with pytest.raises(ModelError, match="sha256"):
        select(manifest, backend="auto", provider="cpu", precision="auto",
               open_step=_opener(lambda s: None, opened), available=_all_available)
    assert opened == []
    # Only artifacts of steps that are tried are checked: with TensorRT down, the tampered file is never used.
    trt_down = lambda kind, prov: (kind != "tensorrt", "no TensorRT")  # noqa: E731
    sel = select(manifest, backend="auto", provider="cpu", precision="auto",
                 open_step=_opener(lambda s: None, opened), available=trt_down)
    assert str(sel.step) == "onnxruntime+cuda/fp16"


# ----------------------------------------------------------------------------- load_model, real ONNX Runtime
def _no_tensorrt(monkeypatch: pytest.MonkeyPatch, extra_providers: tuple[str, ...] = ()) -> None:
    """TensorRT down; ONNX Runtime claims ``extra_providers`` as onnxruntime-gpu does without its libraries."""
    from edge.inference.backends import onnxruntime as ort_backend

    real_available = backends.runtime_available
    real_providers = ort_backend.available_providers()
    monkeypatch.setattr(
        backends, "runtime_available",
        lambda kind, prov="cpu": (False, "test: no TensorRT") if kind == "tensorrt" else real_available(kind, prov),
    )
    listed = real_providers + [p for p in extra_providers if p not in real_providers]
    monkeypatch.setattr(ort_backend, "available_providers", lambda: list(listed))


def test_load_model_auto_falls_back_to_the_cpu_and_says_why(
    fixture_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge.inference.backends.onnxruntime import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("onnxruntime-gpu is installed; the CUDA step is covered by the next test")
    _no_tensorrt(monkeypatch)
    with load_model("tiny-seg", engines_dir=fixture_engines, backend="auto", precision="auto") as m:
        assert (m.backend_label, m.precision) == ("onnxruntime", "int8")
        assert m.failed_steps == ("tensorrt", "onnxruntime+cuda")
        assert "tensorrt unavailable: test: no TensorRT" in m.fallback
        assert "onnxruntime+cuda unavailable: ONNX Runtime execution provider CUDAExecutionProvider" in m.fallback
        [res] = m.run([np.zeros((32, 32), np.uint8)])
        assert res.status == "ok"


def test_listed_but_not_started_cuda_provider_is_detected_by_the_chain(
    fixture_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime lists CUDA but the session runs on the CPU: a failed step, not a quiet CPU 'cuda'."""
    _no_tensorrt(monkeypatch, ("CUDAExecutionProvider",))
    with load_model("tiny-seg", engines_dir=fixture_engines, backend="auto", precision="fp32") as m:
        if m.backend_label == "onnxruntime+cuda":  # a machine where CUDA really starts
            assert m.backend.providers[0] == "CUDAExecutionProvider"  # type: ignore[attr-defined]
            return
        assert (m.backend_label, m.precision) == ("onnxruntime", "fp32")
        assert m.failed_steps == ("tensorrt", "onnxruntime+cuda")
        assert "onnxruntime+cuda unavailable: ONNX Runtime " in m.fallback
        assert m.backend.providers == ("CPUExecutionProvider",)  # type: ignore[attr-defined]


def test_tampered_artifact_stops_auto_too(engines_copy: Path) -> None:
    with open(engines_copy / "tiny-seg" / "model.int8.onnx", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelError, match="sha256"):
        load_model("tiny-seg", engines_dir=engines_copy, backend="auto", precision="int8")
    with load_model("tiny-seg", engines_dir=engines_copy, precision="fp32") as m:
        assert m.precision == "fp32"
