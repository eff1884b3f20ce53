"""The TensorRT backend's logic on the CPU, against fake ``tensorrt`` and ``cuda.bindings`` modules.

The fakes follow TensorRT 10's and cuda-python's call signatures; "device"
memory is ordinary memory and the fake engine computes the fixture
segmentation model (``logits = 20 * (x - 0.5)``) from whatever the backend
copied to the input's device address. This checks the build -> cache ->
deserialize -> allocate -> H2D -> execute -> D2H flow without a GPU; the
real thing is covered by the ``gpu``-marked test in test_backends.py.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SUCCESS = "cudaSuccess"


def _fake_cudart() -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    keep: dict[int, Any] = {}

    class cudaError_t:  # noqa: N801 - cuda-python's name
        cudaSuccess = SUCCESS

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def _alloc(n: int) -> tuple[str, int]:
        buf = ctypes.create_string_buffer(max(1, n))
        keep[ctypes.addressof(buf)] = buf
        return SUCCESS, ctypes.addressof(buf)

    def _free(ptr: int) -> tuple[str]:
        keep.pop(int(ptr))
        return (SUCCESS,)

    class Props:
        name = b"Fake GPU 9000\x00"
        major, minor = 8, 6

    rt.cudaError_t = cudaError_t  # type: ignore[attr-defined]
    rt.cudaMemcpyKind = cudaMemcpyKind  # type: ignore[attr-defined]
    rt.cudaMallocHost = _alloc  # type: ignore[attr-defined]
    rt.cudaMalloc = _alloc  # type: ignore[attr-defined]
    rt.cudaFreeHost = _free  # type: ignore[attr-defined]
    rt.cudaFree = _free  # type: ignore[attr-defined]
    rt.cudaGetDeviceCount = lambda: (SUCCESS, 1)  # type: ignore[attr-defined]
    rt.cudaSetDevice = lambda d: (SUCCESS,)  # type: ignore[attr-defined]
    rt.cudaGetDeviceProperties = lambda d: (SUCCESS, Props())  # type: ignore[attr-defined]
    rt.cudaStreamCreate = lambda: (SUCCESS, 7)  # type: ignore[attr-defined]
    rt.cudaStreamDestroy = lambda s: (SUCCESS,)  # type: ignore[attr-defined]
    rt.cudaStreamSynchronize = lambda s: (SUCCESS,)  # type: ignore[attr-defined]
    rt.cudaEventCreate = lambda: (SUCCESS, object())  # type: ignore[attr-defined]
    rt.cudaEventDestroy = lambda e: (SUCCESS,)  # type: ignore[attr-defined]
    rt.cudaEventRecord = lambda e, s: (SUCCESS,)  # type: ignore[attr-defined]
    rt.cudaEventElapsedTime = lambda a, b: (SUCCESS, 0.25)  # type: ignore[attr-defined]

    def _memcpy(dst: int, src: int, n: int, kind: int, stream: int) -> tuple[str]:
        ctypes.memmove(int(dst), int(src), int(n))
        return (SUCCESS,)

    rt.cudaMemcpyAsync = _memcpy  # type: ignore[attr-defined]
    rt.live_allocations = keep  # type: ignore[attr-defined]
    return rt


def _fake_tensorrt(builds: list[dict[str, Any]]) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class MemoryPoolType:
        WORKSPACE = "ws"

    class BuilderFlag:
        FP16, INT8 = "fp16", "int8"

    class Profile:
        def set_shape(self, name: str, mn: tuple, opt: tuple, mx: tuple) -> None:
            self.shapes = (name, mn, opt, mx)

    class Config:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.profiles: list[Profile] = []

        def set_memory_pool_limit(self, pool: str, n: int) -> None:
            self.workspace = n

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, p: Profile) -> int:
            self.profiles.append(p)
            return 0

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> object:
            assert flags == 0
            return object()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: object, config: Config) -> bytes:
            builds.append({"flags": set(config.flags), "profile": config.profiles[0].shapes})
            return b"FAKEPLAN"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: object, logger: Logger) -> None:
            pass

        def parse(self, data: bytes) -> bool:
            return data[:1] != b""

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}
            self.addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            return self.shapes["image"] if name == "logits" else self.shapes[name]

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            shape = self.shapes["image"]
            n = int(np.prod(shape))
            x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addr["image"]))
            y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addr["logits"]))
            y[:] = 20.0 * (x - 0.5)
            return True

    class Engine:
        num_io_tensors = 2
        _names = ["logits", "image"]  # outputs listed first on purpose

        def get_tensor_name(self, i: int) -> str:
            return self._names[i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine() if plan == b"FAKEPLAN" else None

    for obj in (Logger, TensorIOMode, MemoryPoolType, BuilderFlag, Builder, OnnxParser, Runtime):
        setattr(trt, obj.__name__, obj)
    trt.nptype = lambda dt: np.float32  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    builds: list[dict[str, Any]] = []
    rt = _fake_cudart()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(builds))
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    mod = importlib.reload(importlib.import_module("edge.inference.backends.tensorrt"))
    yield mod, builds, rt
    monkeypatch.undo()
    importlib.reload(mod)


def test_build_cache_run_and_free(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    mod, builds, rt = fake_gpu
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    kw = dict(onnx_sha256="ab" * 32, model_name="tiny-seg", precision="int8", input_name="image",
              input_chw=(1, 64, 64), max_batch=4, cache_dir=tmp_path)
    assert mod.tensorrt_available()[0]
    with mod.TensorRTBackend(onnx_path, **kw) as be:
        assert be.key.gpu_name == "Fake GPU 9000" and be.key.compute_capability == (8, 6)
        assert be.plan_path.is_file() and be.plan_path.with_suffix(".json").is_file()
        assert be.output_names == ("logits",)
        x = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
        out = be.infer(x)
        np.testing.assert_allclose(out["logits"], 20 * (x - 0.5), rtol=1e-6)
        assert out["logits"].shape == (3, 1, 64, 64)
        out2 = be.infer(x[:1] * 0)
        np.testing.assert_allclose(out["logits"], 20 * (x - 0.5), rtol=1e-6)  # first result is a copy
        assert out2["logits"].shape == (1, 1, 64, 64) and np.allclose(out2["logits"], -10)
        assert set(be.last_timings_ms) == {"h2d", "compute", "d2h"}
        with pytest.raises(ValueError, match="max_batch"):
            be.infer(np.zeros((5, 1, 64, 64), np.float32))
    assert rt.live_allocations == {}  # every pinned and device buffer freed
    assert len(builds) == 1 and builds[0]["flags"] == {"int8", "fp16"}
    assert builds[0]["profile"] == ("image", (1, 1, 64, 64), (4, 1, 64, 64), (4, 1, 64, 64))
    with mod.TensorRTBackend(onnx_path, **kw):  # same key: the cached plan, no new build
        pass
    assert len(builds) == 1
    with mod.TensorRTBackend(onnx_path, **{**kw, "onnx_sha256": "cd" * 32}):  # new model: new plan
        pass
    assert len(builds) == 2 and len(list(tmp_path.glob("*.plan"))) == 2


def test_corrupt_cached_plan_is_an_error(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    mod, _, _ = fake_gpu
    kw = dict(onnx_sha256="ab" * 32, model_name="m", precision="fp16", input_name="image",
              input_chw=(1, 64, 64), max_batch=2, cache_dir=tmp_path)
    with mod.TensorRTBackend(fixture_engines / "tiny-seg" / "model.onnx", **kw) as be:
        plan = be.plan_path
    plan.write_bytes(b"garbage")
    with pytest.raises(mod.EngineBuildError, match="delete it to rebuild"):
        mod.TensorRTBackend(fixture_engines / "tiny-seg" / "model.onnx", **kw)


def test_model_registry_on_the_tensorrt_backend(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    """``backend = "tensorrt"`` through load_model: fp16 is built from the fp32 ONNX file."""
    from edge.inference import backends
    from edge.inference.model import load_model

    importlib.reload(backends)  # pick up the faked tensorrt module
    with load_model("tiny-seg", engines_dir=fixture_engines, backend="tensorrt", precision="fp16",
                    cache_dir=tmp_path) as model:
        assert model.backend_label == "tensorrt" and model.precision == "fp16"
        img = np.zeros((100, 100), np.uint8)
        img[:50] = 200
        [res] = model.run([img])
        assert res.status == "ok" and res.mask[:45].all() and not res.mask[55:].any()
    with load_model("tiny-seg", engines_dir=fixture_engines, backend="auto", precision="auto",
                    cache_dir=tmp_path) as model:
        assert model.backend_label == "tensorrt" and model.precision == "int8" and model.fallback == ""
