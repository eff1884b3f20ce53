"""The TensorRT backend's logic on the CPU, against fake ``tensorrt`` and ``cuda.bindings`` modules.

The fakes follow TensorRT 10/11's and cuda-python's call signatures and
provide every name the backend declares it uses (:data:`TRT_API_USED`,
:data:`CUDART_API_USED`, checked here on the fakes and, where the real
libraries import, in test_tensorrt_api.py). "Device" memory is ordinary
memory and the fake engine computes the fixture segmentation model
(``logits = 20 * (x - 0.5)``) from whatever the backend copied to the
input's device address, in the engine's I/O dtype (fp32 or fp16). This
checks strong typing, the cache, deserialize, allocate, H2D, execute, D2H,
per-thread devices and close-under-the-lock without a GPU; the real thing
is the ``gpu``-marked test in test_backends.py and benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import socket
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.errors import BackendUnavailableError, EngineBuildError, ModelError

SUCCESS = "cudaSuccess"
NON_BLOCKING = 1
STREAM_HANDLE = 0xBEEF


class FakeStream:
    """A cudaStream_t: ``int()`` is the handle, ``getPtr()`` the address of the handle (not what TensorRT wants)."""

    def __int__(self) -> int:
        return STREAM_HANDLE

    def getPtr(self) -> int:  # noqa: N802 - cuda-python's name
        return 0xDEAD


def _fake_cudart(log: dict[str, Any]) -> types.ModuleType:
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
        log["alloc_bytes"].append(n)
        return SUCCESS, ctypes.addressof(buf)

    def _free(ptr: int) -> tuple[str]:
        keep.pop(int(ptr))
        log["events"].append("free")
        return (SUCCESS,)

    class Props:
        name = b"Fake GPU 9000\x00"
        major, minor = 8, 6
        totalGlobalMem = 16 << 30

    def _set_device(d: int) -> tuple[str]:
        log["set_device"].append((threading.get_ident(), d))
        return (SUCCESS,)

    def _stream(flags: int) -> tuple[str, FakeStream]:
        log["stream_flags"].append(flags)
        return SUCCESS, FakeStream()

    def _memcpy(dst: int, src: int, n: int, kind: int, stream: Any) -> tuple[str]:
        ctypes.memmove(int(dst), int(src), int(n))
        return (SUCCESS,)

    members: dict[str, Any] = {
        "cudaError_t": cudaError_t, "cudaMemcpyKind": cudaMemcpyKind, "cudaStream_t": FakeStream,
        "cudaMallocHost": _alloc, "cudaMalloc": _alloc, "cudaFreeHost": _free, "cudaFree": _free,
        "cudaGetDeviceCount": lambda: (SUCCESS, 2), "cudaSetDevice": _set_device,
        "cudaGetDeviceProperties": lambda d: (SUCCESS, Props()),
        "cudaStreamCreateWithFlags": _stream, "cudaStreamNonBlocking": NON_BLOCKING,
        "cudaStreamDestroy": lambda s: (SUCCESS,), "cudaStreamSynchronize": lambda s: (SUCCESS,),
        "cudaEventCreate": lambda: (SUCCESS, object()), "cudaEventDestroy": lambda e: (SUCCESS,),
        "cudaEventRecord": lambda e, s: (SUCCESS,), "cudaEventElapsedTime": lambda a, b: (SUCCESS, 0.25),
        "cudaMemcpyAsync": _memcpy, "live_allocations": keep,
    }
    for k, v in members.items():
        setattr(rt, k, v)
    return rt


def _fake_tensorrt(log: dict[str, Any], version: str = "10.16.1.11") -> types.ModuleType:  # noqa: C901
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.io_dtype = np.float32  # type: ignore[attr-defined]  # the engine's I/O type
    trt.layers = [("QUANTIZE", "HALF")]  # type: ignore[attr-defined]  # what a parsed network holds

    class Logger:
        WARNING = 2

        def __init__(self, level: int = 2) -> None:
            self.level = level

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class MemoryPoolType:
        WORKSPACE = "ws"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class LayerType:
        QUANTIZE, DEQUANTIZE, CONVOLUTION = "q", "dq", "conv"

    class DataType:
        FLOAT, HALF = "float", "half"

    class ITensor:
        dtype = "float"

        def __init__(self, dtype: str) -> None:
            self.dtype = dtype

    class ILayer:
        type, num_outputs = "conv", 1

        def __init__(self, kind: str, dtype: str) -> None:
            self.type = getattr(LayerType, kind)
            self.num_outputs = 1
            self._out = ITensor(getattr(DataType, dtype))

        def get_output(self, i: int) -> ITensor:
            return self._out

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self._layers = [ILayer(k, d) for k, d in trt.layers]  # type: ignore[attr-defined]

        @property
        def num_layers(self) -> int:
            return len(self._layers)

        def get_layer(self, i: int) -> ILayer:
            return self._layers[i]

    class IOptimizationProfile:
        def set_shape(self, name: str, mn: tuple, opt: tuple, mx: tuple) -> None:
            self.shapes = (name, mn, opt, mx)

    class IBuilderConfig:  # no set_flag: a precision flag would fail here, as on TensorRT 11
        def __init__(self) -> None:
            self.profiles: list[IOptimizationProfile] = []

        def set_memory_pool_limit(self, pool: str, n: int) -> None:
            self.workspace = n

        def add_optimization_profile(self, p: IOptimizationProfile) -> int:
            self.profiles.append(p)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            if log.get("no_gpu"):
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes:
            log["builds"].append({"flags": network.flags, "profile": config.profiles[0].shapes,
                                  "workspace": config.workspace})
            return b"FAKEPLAN"

    class ParserError:
        def __init__(self, i: int) -> None:
            self.i = i

        def desc(self) -> str:
            return f"unsupported thing {self.i}\nsecond line"

        def node(self) -> int:
            return self.i

        def node_name(self) -> str:
            return "" if self.i % 2 else f"conv_{self.i}"

        def node_operator(self) -> str:
            return "Conv"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.num_errors = 0

        def parse(self, data: bytes, path: str | None = None) -> bool:
            if data.startswith(b"BAD"):
                self.num_errors = 7
                return False
            return True

        def get_error(self, i: int) -> ParserError:
            return ParserError(i)

    class IExecutionContext:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}
            self.addr: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shapes[name] = tuple(shape)
            return shape[0] <= 64

        def get_tensor_shape(self, name: str) -> tuple:
            return self.shapes["image"] if name == "logits" else self.shapes[name]

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            log["handles"].append(stream_handle)
            gate = log.get("gate")
            if gate is not None:  # a test holds this call "in flight"
                gate[0].set()
                gate[1].wait(30)
                log["events"].append("executed")
            dt = np.dtype(trt.io_dtype)  # type: ignore[attr-defined]
            n = int(np.prod(self.shapes["image"]))
            x = np.frombuffer((ctypes.c_ubyte * (n * dt.itemsize)).from_address(self.addr["image"]), dt)
            y = np.frombuffer((ctypes.c_ubyte * (n * dt.itemsize)).from_address(self.addr["logits"]), dt)
            y[:] = (20.0 * (x.astype(np.float32) - 0.5)).astype(dt)
            return True

    class ICudaEngine:
        num_io_tensors = 2
        _names = ["logits", "image"]  # outputs listed first on purpose

        def get_tensor_name(self, i: int) -> str:
            return self._names[i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> Any:
            return trt.io_dtype  # type: ignore[attr-defined]

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> ICudaEngine | None:
            log["deserialized"].append(bytes(plan))
            return ICudaEngine() if plan == b"FAKEPLAN" and not log.get("reject_all") else None

    for obj in (Logger, TensorIOMode, MemoryPoolType, NetworkDefinitionCreationFlag, LayerType, DataType, ITensor,
                ILayer, INetworkDefinition, IOptimizationProfile, IBuilderConfig, Builder, ParserError, OnnxParser,
                IExecutionContext, ICudaEngine, Runtime):
        setattr(trt, obj.__name__, obj)
    trt.nptype = lambda dt: dt  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    log: dict[str, Any] = {k: [] for k in ("builds", "set_device", "stream_flags", "handles", "events",
                                           "alloc_bytes", "deserialized")}
    rt = _fake_cudart(log)
    trt = _fake_tensorrt(log)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # cuda-python < 12.9.1: int(stream)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    mod = importlib.import_module("edge.inference.backends.tensorrt")
    yield types.SimpleNamespace(mod=mod, log=log, rt=rt, trt=trt)


def _kw(tmp_path: Path, onnx: Path, **over: Any) -> dict[str, Any]:
    kw = dict(onnx_sha256=hashlib.sha256(onnx.read_bytes()).hexdigest(), model_name="tiny-seg", precision="int8",
              input_name="image", input_chw=(1, 64, 64), max_batch=4, cache_dir=tmp_path / "cache")
    return {**kw, **over}


def _resolve(module: types.ModuleType, dotted: str) -> bool:
    obj: Any = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_the_fakes_provide_every_name_the_backend_uses(fake_gpu: Any) -> None:
    from edge.inference.backends.cuda_runtime import CUDART_API_USED
    from edge.inference.backends.tensorrt import TRT_API_USED

    assert [n for n in TRT_API_USED if not _resolve(fake_gpu.trt, n)] == []
    assert [n for n in CUDART_API_USED if not _resolve(fake_gpu.rt, n)] == []


def test_build_cache_run_and_free(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    mod, log, rt = fake_gpu.mod, fake_gpu.log, fake_gpu.rt
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    kw = _kw(tmp_path, onnx_path)
    assert mod.tensorrt_available()[0]
    with mod.TensorRTBackend(onnx_path, **kw) as be:
        assert be.key.gpu_name == "Fake GPU 9000" and be.key.compute_capability == (8, 6)
        assert be.key.input_chw == (1, 64, 64) and be.key.device_id == 0
        assert be.plan_path.is_file() and be.plan_path.with_suffix(".json").is_file()
        assert be.output_names == ("logits",)
        x = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
        out = be.infer(x)
        np.testing.assert_allclose(out["logits"], 20 * (x - 0.5), rtol=1e-6)
        out2 = be.infer(x[:1] * 0)
        np.testing.assert_allclose(out["logits"], 20 * (x - 0.5), rtol=1e-6)  # first result is a copy
        assert out2["logits"].shape == (1, 1, 64, 64) and np.allclose(out2["logits"], -10)
        assert set(be.last_timings_ms) == {"h2d", "compute", "d2h"}
        with pytest.raises(ValueError, match="max_batch"):
            be.infer(np.zeros((5, 1, 64, 64), np.float32))
    assert rt.live_allocations == {}  # every pinned and device buffer freed
    [build] = log["builds"]
    assert build["flags"] == 1 << 1  # STRONGLY_TYPED, and (no set_flag on the fake config) no precision flag
    assert build["profile"] == ("image", (1, 1, 64, 64), (4, 1, 64, 64), (4, 1, 64, 64))  # opt = max_batch
    assert build["workspace"] == 1 << 30
    assert log["stream_flags"] == [NON_BLOCKING]
    assert set(log["handles"]) == {STREAM_HANDLE}  # the handle's value, not getPtr()
    with mod.TensorRTBackend(onnx_path, **kw):  # same key: the cached plan, no new build
        pass
    assert len(log["builds"]) == 1
    with mod.TensorRTBackend(onnx_path, **{**kw, "max_batch": 2}):  # another profile: another plan
        pass
    assert len(log["builds"]) == 2 and len(list((tmp_path / "cache").glob("*.plan"))) == 2


def test_the_native_handle_comes_from_cuda_bindings_utils(fake_gpu: Any, fixture_engines: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda s: 0xCAFE  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    with fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path)) as be:
        be.infer(np.zeros((1, 1, 64, 64), np.float32))
    assert fake_gpu.log["handles"] == [0xCAFE]


def test_fp16_engine_io_allocates_by_itemsize(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    fake_gpu.trt.io_dtype = np.float16
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    with fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, precision="fp16")) as be:
        assert {b.dtype for b in be._buffers.values()} == {np.dtype(np.float16)}
        assert sorted(fake_gpu.log["alloc_bytes"])[-1] == 4 * 64 * 64 * 2  # max batch, fp16
        x = np.random.default_rng(1).random((2, 1, 64, 64), dtype=np.float32)
        out = be.infer(x)["logits"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 20 * (x - 0.5), atol=0.05)  # fp16 rounding


@pytest.mark.parametrize("dtype", [np.float16, np.int8, np.bool_, np.float32])
def test_host_device_buffer_of_any_dtype(fake_gpu: Any, dtype: Any) -> None:
    from edge.inference.backends.cuda_runtime import HostDeviceBuffer

    with HostDeviceBuffer(fake_gpu.rt, (3, 5), dtype) as buf:
        assert buf.nbytes == 15 * np.dtype(dtype).itemsize and buf.host.dtype == np.dtype(dtype)
        buf.host[...] = 1
        assert buf.host_view((2, 5)).shape == (2, 5) and bool(buf.host_view((2, 5)).all())
    assert fake_gpu.rt.live_allocations == {}
    with pytest.raises(ModelError, match="too large"):
        HostDeviceBuffer(fake_gpu.rt, (1 << 40,), dtype)


def test_each_thread_sets_the_device_once(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    log = fake_gpu.log
    x = np.zeros((1, 1, 64, 64), np.float32)
    with fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, device_id=1)) as b1, \
            fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, device_id=0)) as b0:
        seen: dict[str, int] = {}
        both = threading.Barrier(2, timeout=30)  # alive together, so their thread ids differ

        def worker(name: str, plan: list[Any]) -> None:
            seen[name] = threading.get_ident()
            both.wait()
            for be in plan:
                be.infer(x)
            both.wait()

        t1 = threading.Thread(target=worker, args=("one", [b1, b1]))  # same device twice: one cudaSetDevice
        t2 = threading.Thread(target=worker, args=("mixed", [b1, b0, b1]))  # the device moves each time
        for t in (t1, t2):
            t.start()
        for t in (t1, t2):
            t.join(30)
    calls = log["set_device"]
    assert [d for tid, d in calls if tid == seen["one"]] == [1]
    assert [d for tid, d in calls if tid == seen["mixed"]] == [1, 0, 1]


class _WatchedLock:
    """A lock that says when a thread starts waiting for it (so a test knows close() is blocked)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting: dict[str, threading.Event] = {}

    def __enter__(self) -> "_WatchedLock":
        ev = self.waiting.get(threading.current_thread().name)
        if ev is not None:
            ev.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_close_waits_for_the_call_in_flight_then_infer_is_refused(fake_gpu: Any, fixture_engines: Path,
                                                                   tmp_path: Path) -> None:
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    log = fake_gpu.log
    be = fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path))
    be._lock = watched = _WatchedLock()
    entered, release = threading.Event(), threading.Event()
    log["gate"] = (entered, release)
    result: dict[str, Any] = {}
    x = np.full((2, 1, 64, 64), 0.75, np.float32)
    worker = threading.Thread(target=lambda: result.setdefault("out", be.infer(x)))
    worker.start()
    assert entered.wait(30)  # the worker is inside execute_async_v3, holding the lock
    watched.waiting["closer"] = closer_waits = threading.Event()
    closer = threading.Thread(target=be.close, name="closer")
    closer.start()
    assert closer_waits.wait(30)  # close() now waits for the lock the worker holds
    assert "free" not in log["events"]  # nothing was freed under the call in flight
    release.set()
    worker.join(30)
    closer.join(30)
    assert not worker.is_alive() and not closer.is_alive()
    assert "free" in log["events"] and log["events"].index("executed") < log["events"].index("free")
    np.testing.assert_allclose(result["out"]["logits"], 5.0)
    assert fake_gpu.rt.live_allocations == {}
    log.pop("gate")
    with pytest.raises(BackendUnavailableError, match="closed"):
        be.infer(x)
    be.close()  # idempotent


def test_a_refused_input_shape_is_a_model_error(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    with fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path)) as be:
        be._context.set_input_shape = lambda name, shape: False
        with pytest.raises(ModelError, match="optimisation profile"):
            be.infer(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(ModelError, match="optimisation profile"):  # at start-up: a profile smaller than asked
        fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, max_batch=65))
    assert fake_gpu.rt.live_allocations == {}


def test_a_corrupt_cached_plan_is_rebuilt_once(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    kw = _kw(tmp_path, onnx_path, precision="fp16")
    with fake_gpu.mod.TensorRTBackend(onnx_path, **kw) as be:
        plan = be.plan_path
    plan.write_bytes(b"garbage")
    with fake_gpu.mod.TensorRTBackend(onnx_path, **kw):
        pass
    assert len(fake_gpu.log["builds"]) == 2 and plan.read_bytes() == b"FAKEPLAN"
    fake_gpu.log["reject_all"] = True  # a fresh plan that does not load either: an error, no loop
    plan.write_bytes(b"garbage")
    with pytest.raises(EngineBuildError, match="cannot load"):
        fake_gpu.mod.TensorRTBackend(onnx_path, **kw)
    assert len(fake_gpu.log["builds"]) == 3


def test_parser_errors_are_one_line_each_and_bounded(fake_gpu: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"BAD model")
    with pytest.raises(EngineBuildError) as err:
        fake_gpu.mod.TensorRTBackend(bad, **_kw(tmp_path, bad, precision="fp32"))
    msg = str(err.value)
    assert "\n" not in msg and "cannot parse bad.onnx" in msg
    assert "node conv_0 (Conv): unsupported thing 0 second line" in msg and "node #1 (Conv)" in msg
    assert "thing 4" in msg and "thing 5" not in msg and "... and 2 more" in msg


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_network_without_its_precision_is_refused(fake_gpu: Any, fixture_engines: Path, tmp_path: Path,
                                                    precision: str) -> None:
    """Strong typing takes the precision from the file: an fp32 file under an fp16/int8 label is an error."""
    fake_gpu.trt.layers = [("CONVOLUTION", "FLOAT")]
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    with pytest.raises(ModelError, match=f"holds no .*strongly typed {precision}"):
        fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, precision=precision))
    with fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, precision="fp32")):
        pass


def test_failures_are_backend_unavailable_or_model_errors(fake_gpu: Any, fixture_engines: Path,
                                                          tmp_path: Path) -> None:
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    fake_gpu.log["no_gpu"] = True  # what the real Builder() does without a usable GPU
    with pytest.raises(BackendUnavailableError, match="factory function returned nullptr"):
        fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path))
    fake_gpu.log["no_gpu"] = False
    with pytest.raises(ModelError, match="changed since its sha256"):
        fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, onnx_sha256="0" * 64))
    fake_gpu.rt.cudaGetDeviceProperties = lambda d: ("cudaErrorInvalidDevice", None)
    with pytest.raises(BackendUnavailableError, match="cudaErrorInvalidDevice"):
        fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path, device_id=7))
    del fake_gpu.rt.cudaStreamCreateWithFlags  # an API the bindings lack: still the one error type
    fake_gpu.rt.cudaGetDeviceProperties = _fake_cudart(fake_gpu.log).cudaGetDeviceProperties
    with pytest.raises(BackendUnavailableError, match="cudaStreamCreateWithFlags"):
        fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path))
    assert fake_gpu.rt.live_allocations == {}


def test_network_flags_on_10_and_11() -> None:
    from edge.inference.backends.tensorrt_build import network_flags

    flag = types.SimpleNamespace(STRONGLY_TYPED=1)
    assert network_flags(types.SimpleNamespace(__version__="10.3.0", NetworkDefinitionCreationFlag=flag)) == 2
    assert network_flags(types.SimpleNamespace(__version__="11.4.0", NetworkDefinitionCreationFlag=flag)) == 2
    bare = types.SimpleNamespace()
    assert network_flags(types.SimpleNamespace(__version__="12.0.0", NetworkDefinitionCreationFlag=bare)) == 0
    with pytest.raises(BackendUnavailableError, match="no strongly typed"):
        network_flags(types.SimpleNamespace(__version__="10.0.0", NetworkDefinitionCreationFlag=bare))


def test_a_build_under_systemd_extends_the_start_timeout(fake_gpu: Any, fixture_engines: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The default progress hook sends EXTEND_TIMEOUT_USEC on $NOTIFY_SOCKET while a plan is built."""
    sock_path = tmp_path / "notify.sock"
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(sock_path))
        srv.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
        with fake_gpu.mod.TensorRTBackend(onnx_path, **_kw(tmp_path, onnx_path)):
            pass
        assert srv.recv(256) == b"EXTEND_TIMEOUT_USEC=60000000"


def test_model_registry_on_the_tensorrt_backend(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    """``backend = "tensorrt"`` through load_model serves the model on the native backend."""
    from edge.inference import backends
    from edge.inference.model import load_model

    importlib.reload(backends)  # pick up the faked tensorrt module
    with load_model("tiny-seg", engines_dir=fixture_engines, backend="tensorrt", precision="fp32",
                    cache_dir=tmp_path) as model:
        assert model.backend_label == "tensorrt" and model.precision == "fp32"
        img = np.zeros((100, 100), np.uint8)
        img[:50] = 200
        [res] = model.run([img])
        assert res.status == "ok" and res.mask[:45].all() and not res.mask[55:].any()


def test_engine_key_for_tools_is_the_backends_key(fake_gpu: Any, fixture_engines: Path, tmp_path: Path) -> None:
    onnx_path = fixture_engines / "tiny-seg" / "model.onnx"
    kw = _kw(tmp_path, onnx_path, device_id=1)
    with fake_gpu.mod.TensorRTBackend(onnx_path, **kw) as be:
        key = fake_gpu.mod.engine_key(1, precision="int8", onnx_sha256=kw["onnx_sha256"], max_batch=4,
                                      input_chw=(1, 64, 64))
        assert key == be.key
        assert fake_gpu.mod.engine_cache_path(kw["cache_dir"], "tiny-seg", key) == be.plan_path
