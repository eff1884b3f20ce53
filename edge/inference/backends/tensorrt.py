"""Native TensorRT backend: engines built on the target, cached, run on a CUDA stream.

Written against TensorRT 10's Python API (``tensorrt.Builder``,
``OnnxParser``, ``BuilderFlag``, ``IExecutionContext.set_tensor_address`` and
``execute_async_v3``) and the CUDA runtime bindings of cuda-python
(``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases).
TensorRT 11 removes the ``BuilderFlag.INT8``/``FP16`` weak typing used
here, so the ``tensorrt`` extra pins ``tensorrt<11``.

* **Build on the target.** A TensorRT plan is specific to the GPU, its
  compute capability and the TensorRT version, so the daemon builds it from
  the manifest's ONNX artifact the first time and caches it under the cache
  dir, keyed by GPU name, compute capability, TensorRT version, precision,
  max batch and the ONNX file's sha256 (:func:`engine_cache_key`). A key
  change (new driver stack, new model) builds a new plan; stale plans are
  never loaded.
* **Run.** One execution context and one CUDA stream per backend; the
  input and outputs live in pinned host buffers and device buffers sized for
  ``max_batch`` (:class:`HostDeviceBuffer`, a context manager); a call does an
  async H2D copy, ``execute_async_v3``, async D2H copies and one stream
  synchronize. CUDA events time the three phases (:attr:`last_timings_ms`).

Importing this module never needs TensorRT or CUDA; only constructing
:class:`TensorRTBackend` does, and it raises
:class:`~edge.errors.BackendUnavailableError` when they are missing.

Examples
--------
>>> engine_cache_key(gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
...                  trt_version="10.3.0", precision="fp16", onnx_sha256="ab" * 32,
...                  max_batch=8)[:12]
'543e8002b663'
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge.errors import BackendUnavailableError, EngineBuildError, ModelError
from edge.fileio import atomic_write, atomic_write_text

__all__ = [
    "TensorRTBackend",
    "HostDeviceBuffer",
    "EngineKey",
    "engine_cache_key",
    "engine_cache_path",
    "tensorrt_available",
    "build_engine",
]

_log = logging.getLogger(__name__)

_WORKSPACE_BYTES = 1 << 30


# --------------------------------------------------------------------------- imports
def _import_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT is not installed (pip install 'medge[tensorrt]' on a machine with an NVIDIA GPU)."
        ) from exc
    return trt


def _import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except ImportError as exc:
            raise BackendUnavailableError(
                "cuda-python is not installed (pip install 'medge[tensorrt]')."
            ) from exc
    return cudart


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT, cuda-python and a CUDA device are usable here, and why not."""
    try:
        trt = _import_tensorrt()
        cudart = _import_cudart()
        count = _check(cudart, cudart.cudaGetDeviceCount())
    except BackendUnavailableError as exc:
        return False, str(exc)
    except RuntimeError as exc:
        return False, f"CUDA is not usable: {exc}"
    if not count:
        return False, "no CUDA device is visible"
    return True, f"TensorRT {trt.__version__}, {count} CUDA device(s)"


def _check(cudart: ModuleType, result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error code."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise RuntimeError(f"CUDA runtime call failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


# --------------------------------------------------------------------------- cache keys
@dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT plan depends on."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str
    precision: str
    onnx_sha256: str
    max_batch: int

    def digest(self) -> str:
        """Stable hex sha256 of the key."""
        return engine_cache_key(**self.__dict__)


def engine_cache_key(
    *,
    gpu_name: str,
    compute_capability: tuple[int, int],
    trt_version: str,
    precision: str,
    onnx_sha256: str,
    max_batch: int,
) -> str:
    """Hex sha256 identifying one TensorRT plan (pure; testable without a GPU)."""
    payload = json.dumps(
        {
            "gpu": gpu_name.strip(),
            "sm": f"{int(compute_capability[0])}.{int(compute_capability[1])}",
            "trt": trt_version,
            "precision": precision,
            "onnx": onnx_sha256.lower(),
            "max_batch": int(max_batch),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def engine_cache_path(cache_dir: Path | str, model_name: str, key: EngineKey) -> Path:
    """Where the plan for ``key`` lives: ``<cache_dir>/<model>-<precision>-sm<cc>-<digest16>.plan``."""
    cc = f"{key.compute_capability[0]}{key.compute_capability[1]}"
    return Path(cache_dir) / f"{model_name}-{key.precision}-sm{cc}-{key.digest()[:16]}.plan"


# --------------------------------------------------------------------------- build
def build_engine(
    onnx_path: Path | str,
    *,
    precision: str,
    input_name: str,
    input_chw: tuple[int, int, int],
    max_batch: int,
    compute_capability: tuple[int, int] = (7, 5),
    workspace_bytes: int = _WORKSPACE_BYTES,
) -> bytes:
    """Build a serialized TensorRT plan from an ONNX file.

    ``int8`` expects an explicitly quantized (Q/DQ) ONNX file and enables
    FP16 too for the layers left unquantized; ``fp16`` enables FP16; the
    batch axis gets one optimization profile from 1 to ``max_batch``.

    Raises
    ------
    EngineBuildError
        If the ONNX file does not parse or TensorRT cannot build it.
    """
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    data = Path(onnx_path).read_bytes()
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    # platform_has_fast_fp16/int8 are deprecated since TensorRT 10.5: ask the compute capability.
    if precision == "fp16":
        if compute_capability < (5, 3):
            raise BackendUnavailableError("This GPU has no fast FP16; choose precision = 'fp32'.")
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        if compute_capability < (6, 1):
            raise BackendUnavailableError("This GPU has no fast INT8; choose precision = 'fp16' or 'fp32'.")
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the Q/DQ nodes set the scales
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    c, h, w = input_chw
    opt = max(1, min(max_batch, 4))
    profile.set_shape(input_name, (1, c, h, w), (opt, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} ({precision}).")
    return bytes(plan)


# --------------------------------------------------------------------------- buffers
class HostDeviceBuffer:
    """A pinned host array and a device allocation of the same size.

    Use as a context manager (or call :meth:`close`): the memory is freed
    exactly once.
    """

    def __init__(self, cudart: ModuleType, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._cudart = cudart
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._host_ptr = _check(cudart, cudart.cudaMallocHost(self.nbytes))
        try:
            self.device = int(_check(cudart, cudart.cudaMalloc(self.nbytes)))
        except RuntimeError:
            _check(cudart, cudart.cudaFreeHost(self._host_ptr))
            raise
        ctype = np.ctypeslib.as_ctypes_type(self.dtype)
        raw = ctypes.cast(int(self._host_ptr), ctypes.POINTER(ctype))
        self.host: np.ndarray = np.ctypeslib.as_array(raw, (int(np.prod(self.shape)),)).reshape(self.shape)
        self._closed = False

    def host_view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape)`` elements of the host buffer as ``shape``."""
        n = int(np.prod(shape))
        return self.host.reshape(-1)[:n].reshape(shape)

    def close(self) -> None:
        """Free the host and device memory."""
        if self._closed:
            return
        self._closed = True
        _check(self._cudart, self._cudart.cudaFree(self.device))
        _check(self._cudart, self._cudart.cudaFreeHost(self._host_ptr))

    def __enter__(self) -> "HostDeviceBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- backend
class TensorRTBackend:
    """One model as a TensorRT engine on one GPU.

    Parameters
    ----------
    onnx_path : path-like
        The sha256-checked ONNX artifact the plan is built from.
    onnx_sha256 : str
        Its sha256 (from the manifest), part of the cache key.
    model_name : str
        Used in the cache file name.
    precision : str
        ``fp32``, ``fp16`` or ``int8`` (Q/DQ ONNX).
    input_name : str
        The input tensor's name.
    input_chw : tuple of int
        ``(C, H, W)`` of the input.
    max_batch : int
        Largest batch; buffers are allocated for it.
    cache_dir : path-like
        Engine cache folder.
    device_id : int
        CUDA device ordinal.

    Raises
    ------
    BackendUnavailableError
        TensorRT, cuda-python or a CUDA device is missing.
    EngineBuildError
        The engine cannot be built or deserialized.
    """

    name = "tensorrt"

    def __init__(
        self,
        onnx_path: Path | str,
        *,
        onnx_sha256: str,
        model_name: str,
        precision: str,
        input_name: str,
        input_chw: tuple[int, int, int],
        max_batch: int,
        cache_dir: Path | str,
        device_id: int = 0,
    ) -> None:
        if precision not in ("fp32", "fp16", "int8"):
            raise BackendUnavailableError(f"TensorRT precision {precision!r} is not fp32, fp16 or int8.")
        ok, why = tensorrt_available()
        if not ok:
            raise BackendUnavailableError(f"The tensorrt backend cannot run here: {why}.")
        trt = _import_tensorrt()
        cudart = _import_cudart()
        self._trt, self._cudart = trt, cudart
        self.precision = precision
        self.max_batch = int(max_batch)
        self.input_name = input_name
        self._input_chw = tuple(int(v) for v in input_chw)
        _check(cudart, cudart.cudaSetDevice(int(device_id)))
        props = _check(cudart, cudart.cudaGetDeviceProperties(int(device_id)))
        gpu_name = props.name.decode("utf-8", "replace") if isinstance(props.name, bytes) else str(props.name)
        self.key = EngineKey(
            gpu_name=gpu_name.rstrip("\x00"),
            compute_capability=(int(props.major), int(props.minor)),
            trt_version=str(trt.__version__),
            precision=precision,
            onnx_sha256=onnx_sha256,
            max_batch=self.max_batch,
        )
        self.plan_path = engine_cache_path(cache_dir, model_name, self.key)
        plan = self._load_or_build(Path(onnx_path))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineBuildError(f"TensorRT cannot deserialize {self.plan_path}; delete it to rebuild.")
        self._context = self._engine.create_execution_context()
        self._stream = _check(cudart, cudart.cudaStreamCreate())
        self._events = [_check(cudart, cudart.cudaEventCreate()) for _ in range(4)]
        self._buffers: dict[str, HostDeviceBuffer] = {}
        self.output_names: tuple[str, ...] = ()
        outs: list[str] = []
        try:
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            modes = {n: self._engine.get_tensor_mode(n) for n in names}
            # input shapes first: output shapes are only known once every input shape is set
            for tname in names:
                if modes[tname] == trt.TensorIOMode.INPUT:
                    self._context.set_input_shape(tname, (self.max_batch, *self._input_chw))
            for tname in names:
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(tname)))
                if modes[tname] == trt.TensorIOMode.INPUT:
                    shape = (self.max_batch, *self._input_chw)
                else:
                    outs.append(tname)
                    shape = tuple(self._context.get_tensor_shape(tname))
                self._buffers[tname] = HostDeviceBuffer(cudart, shape, dtype)
                self._context.set_tensor_address(tname, self._buffers[tname].device)
        except (RuntimeError, TypeError, ValueError):
            self.close()
            raise
        self.output_names = tuple(outs)
        self.last_timings_ms: dict[str, float] = {}
        self._lock = threading.Lock()  # one context, one stream: one batch at a time
        _log.info("TensorRT engine %s ready (%s, %s, max batch %d).", self.plan_path.name, gpu_name, precision, max_batch)

    def _load_or_build(self, onnx_path: Path) -> bytes:
        if self.plan_path.is_file():
            _log.info("Using cached TensorRT engine %s.", self.plan_path)
            return self.plan_path.read_bytes()
        _log.info("Building TensorRT engine for %s (%s); this takes a while once.", onnx_path, self.precision)
        plan = build_engine(
            onnx_path,
            precision=self.precision,
            input_name=self.input_name,
            input_chw=self._input_chw,  # type: ignore[arg-type]
            max_batch=self.max_batch,
            compute_capability=self.key.compute_capability,
        )
        self.plan_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.plan_path, plan)
        atomic_write_text(
            self.plan_path.with_suffix(".json"),
            json.dumps({**self.key.__dict__, "digest": self.key.digest()}, indent=2),
        )
        return plan

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``[N, C, H, W]`` (N <= max_batch): H2D, execute_async_v3, D2H, one sync.

        Thread-safe (calls are serialised: the context, stream and pinned
        buffers are shared); the GIL is released while waiting on the stream.
        """
        with self._lock:
            return self._infer(batch)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self._cudart
        n = int(batch.shape[0])
        if n > self.max_batch:
            raise ValueError(f"Batch of {n} exceeds max_batch {self.max_batch}.")
        if tuple(batch.shape[1:]) != self._input_chw:
            raise ModelError(f"Batch shape {list(batch.shape)} does not match the engine's input.")
        inp = self._buffers[self.input_name]
        in_shape = (n, *self._input_chw)
        np.copyto(inp.host_view(in_shape), batch, casting="same_kind")
        self._context.set_input_shape(self.input_name, in_shape)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        ev = self._events
        nbytes_in = int(np.prod(in_shape)) * inp.dtype.itemsize
        _check(cudart, cudart.cudaEventRecord(ev[0], self._stream))
        _check(cudart, cudart.cudaMemcpyAsync(inp.device, inp.host.ctypes.data, nbytes_in, h2d, self._stream))
        _check(cudart, cudart.cudaEventRecord(ev[1], self._stream))
        if not self._context.execute_async_v3(int(self._stream)):
            raise ModelError("TensorRT execute_async_v3 failed.")
        _check(cudart, cudart.cudaEventRecord(ev[2], self._stream))
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.output_names:
            buf = self._buffers[name]
            shape = tuple(self._context.get_tensor_shape(name))
            shapes[name] = shape
            nbytes = int(np.prod(shape)) * buf.dtype.itemsize
            _check(cudart, cudart.cudaMemcpyAsync(buf.host.ctypes.data, buf.device, nbytes, d2h, self._stream))
        _check(cudart, cudart.cudaEventRecord(ev[3], self._stream))
        _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        self.last_timings_ms = {
            "h2d": float(_check(cudart, cudart.cudaEventElapsedTime(ev[0], ev[1]))),
            "compute": float(_check(cudart, cudart.cudaEventElapsedTime(ev[1], ev[2]))),
            "d2h": float(_check(cudart, cudart.cudaEventElapsedTime(ev[2], ev[3]))),
        }
        # Copy out of the pinned buffers: the next call overwrites them.
        return {
            name: self._buffers[name].host_view(shapes[name]).astype(np.float32, copy=True)
            for name in self.output_names
        }

    def close(self) -> None:
        """Free buffers, events, the stream, the context and the engine (idempotent)."""
        cudart = getattr(self, "_cudart", None)
        for buf in getattr(self, "_buffers", {}).values():
            buf.close()
        self._buffers = {}
        if cudart is not None:
            for ev in getattr(self, "_events", []):
                cudart.cudaEventDestroy(ev)
            self._events = []
            stream = getattr(self, "_stream", None)
            if stream is not None:
                cudart.cudaStreamDestroy(stream)
                self._stream = None
        self._context = None
        self._engine = None

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
