"""The TensorRT and CUDA API surface the backend relies on, checked against the installed libraries.

Where ``tensorrt`` imports (its wheels import on a CPU-only machine; only
building needs a GPU), every name in :data:`TRT_API_USED` must exist, the
strongly typed flag must be there on 10.x, fp16/int8/bool map to numpy
types of the right size, and a build without a usable GPU must fail with
:class:`BackendUnavailableError`, not a TypeError. Where cuda-python
imports, every name in :data:`CUDART_API_USED` must exist and the stream
handle must be the handle's value. Each part skips, with the import error
as its reason, where its library is absent. The source checks (no
weak-typing flag anywhere, the extras' pins) always run.

Run it against a TensorRT release with, for example::

    python3 -m venv /tmp/trt && /tmp/trt/bin/pip install 'tensorrt-cu12==10.*' 'cuda-python>=12.9.1,<13' \\
        numpy pytest -e . && /tmp/trt/bin/python -m pytest -q tests/edge/test_tensorrt_api.py
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from edge.errors import BackendUnavailableError
from edge.inference.backends.cuda_runtime import CUDART_API_USED, import_cudart, native_handle
from edge.inference.backends.tensorrt import TRT_API_USED, tensorrt_available
from edge.inference.backends.tensorrt_build import build_engine, network_flags, trt_major

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "edge/inference/backends/tensorrt.py", ROOT / "edge/inference/backends/tensorrt_build.py",
           ROOT / "edge/inference/backends/cuda_runtime.py", ROOT / "edge/inference/engine_cache.py",
           ROOT / "trainer/build.py"]


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:
        pytest.skip(f"{name} does not import here: {exc}")


@pytest.fixture(scope="module")
def trt() -> ModuleType:
    if isinstance(sys.modules.get("tensorrt", ""), type(None)):
        pytest.skip("tensorrt is blocked in this process")
    return _import("tensorrt")


@pytest.fixture(scope="module")
def cudart() -> ModuleType:
    try:
        return import_cudart()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


def _missing(module: ModuleType, names: tuple[str, ...]) -> list[str]:
    missing = []
    for dotted in names:
        obj: Any = module
        for part in dotted.split("."):
            if not hasattr(obj, part):
                missing.append(dotted)
                break
            obj = getattr(obj, part)
    return missing


def test_every_tensorrt_name_the_backend_and_medge_build_use_exists(trt: ModuleType) -> None:
    assert _missing(trt, TRT_API_USED) == [], f"TensorRT {trt.__version__}"


def test_networks_are_strongly_typed(trt: ModuleType) -> None:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if trt_major(trt.__version__) == 10:
        assert flag is not None, f"TensorRT {trt.__version__} lacks STRONGLY_TYPED"
    assert network_flags(trt) == (1 << int(flag) if flag is not None else 0)


def test_io_types_map_to_numpy_by_itemsize(trt: ModuleType) -> None:
    sizes = {"FLOAT": 4, "HALF": 2, "INT8": 1, "BOOL": 1, "INT32": 4}
    assert {k: np.dtype(trt.nptype(getattr(trt.DataType, k))).itemsize for k in sizes} == sizes


def test_a_build_without_a_usable_gpu_is_backend_unavailable(trt: ModuleType, fixture_engines: Path) -> None:
    if tensorrt_available()[0]:
        pytest.skip("a GPU is usable here: the gpu-marked tests build for real")
    onnx = fixture_engines / "tiny-seg" / "model.onnx"
    with pytest.raises(BackendUnavailableError):
        build_engine(onnx, precision="fp32", input_name="image", input_chw=(1, 64, 64), max_batch=2)
    ok, why = tensorrt_available()
    assert not ok and why


def test_every_cuda_runtime_name_exists_and_the_stream_handle_is_its_value(cudart: ModuleType) -> None:
    assert _missing(cudart, CUDART_API_USED) == []
    stream = cudart.cudaStream_t(init_value=0x1234)
    assert native_handle(stream) == 0x1234 and stream.getPtr() != 0x1234  # getPtr() is the handle's address
    assert isinstance(cudart.cudaStreamNonBlocking, int) and cudart.cudaStreamNonBlocking == 1


def test_no_weak_typing_or_removed_api_in_the_sources() -> None:
    """BuilderFlag.FP16/INT8 (gone in 11), EXPLICIT_BATCH (gone in 11), platform_has_fast_* (gone in 11)."""
    banned = re.compile(r"trt\.BuilderFlag|\.set_flag\(|\.EXPLICIT_BATCH|\.platform_has_fast|int\(self\._stream\)")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert hits == []


def test_the_tensorrt_extras_pin_matching_cuda_flavours() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cu12, cu13 = " ".join(extras["tensorrt"]), " ".join(extras["tensorrt-cu13"])
    assert "tensorrt-cu12>=10.3,<12" in cu12 and "cuda-python>=12.9.1,<13" in cu12 and "nvidia-ml-py" in cu12
    assert "tensorrt-cu13" in cu13 and "cuda-python>=13,<14" in cu13 and "nvidia-ml-py" in cu13
