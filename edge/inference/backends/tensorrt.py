"""Native TensorRT backend: strongly typed engines built on the target, cached, run on a CUDA stream.

Written against the Python APIs of TensorRT 10.3 (JetPack 6) to 10.16 and
11.x, and the CUDA runtime bindings of cuda-python 12.9.1+ and 13.x
(``cuda.bindings.runtime``; ``cuda.cudart`` for older 12.x releases). Every
TensorRT and CUDA name used is listed in :data:`TRT_API_USED` and
:data:`CUDART_API_USED`; ``tests/edge/test_tensorrt_api.py`` checks them
against whatever ``tensorrt`` and ``cuda-python`` are installed.

* **Strongly typed.** No precision flag is set: the precision is the
  artifact's, fp32 ``model.onnx``, fp16 ``model.fp16.onnx``, int8
  ``model.int8-tensorrt.onnx`` (Q/DQ), and the parsed network must hold what
  ``precision`` promises. Building is :mod:`~edge.inference.backends.tensorrt_build`
  (the 10.x / 11.x differences are there); the CUDA runtime side is
  :mod:`~edge.inference.backends.cuda_runtime`.
* **Profile.** One optimisation profile, batch 1..``max_batch`` with
  ``opt = max_batch``: TensorRT picks its kernels for the opt shape, and a
  full micro-batch is what the scheduler forms under load, when throughput
  matters; a batch-1 call is latency-bound by copies and launches either
  way. Workspace: 1 GiB, at most a quarter of the device's memory.
* **Cache.** :mod:`edge.inference.engine_cache`: one key function (ONNX
  sha256, precision, max batch, input shape, TensorRT version, GPU name and
  compute capability, device), a lock per key, atomic writes, corrupt
  plans rebuilt once, stale plans cleaned. ``medge build`` goes through
  this class, so it writes exactly what the daemon loads.
* **Threads and devices.** ``cudaSetDevice(device_id)`` on every thread
  before its first CUDA call for this device (the current device is
  per-thread state; scheduler workers are not the thread that built the
  engine). One execution context, one non-blocking stream and one set of
  pinned and device buffers per backend, so calls are serialised by a lock;
  :meth:`TensorRTBackend.close` takes the same lock, so it waits for a call
  in flight and frees everything once; ``infer`` after it raises
  :class:`~edge.errors.BackendUnavailableError`.
* **GIL.** cuda-bindings releases the GIL in every call from 12.9.1 on
  (before it, ``cudaStreamSynchronize`` held it and stalled every other
  thread for the whole inference): the ``tensorrt`` extras pin
  ``cuda-python>=12.9.1``, and an older one is logged.

Errors: constructing a backend raises only
:class:`~edge.errors.BackendUnavailableError` (cannot run here: library,
driver, device, API) or :class:`~edge.errors.ModelError` (the artifact is
bad; :class:`~edge.errors.EngineBuildError` for a failed parse or build),
each with a one-line reason.

Importing this module never needs TensorRT or CUDA.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.errors import BackendUnavailableError, ModelError
from edge.inference.backends.cuda_runtime import (
    CUDART_API_USED,
    GIL_FREE_BINDINGS,
    HostDeviceBuffer,
    bindings_version,
    check,
    import_cudart,
    native_handle,
    use_device,
)
from edge.inference.backends.tensorrt_build import (
    WORKSPACE_BYTES,
    build_engine,
    import_tensorrt,
    network_flags,
    one_line,
    parser_errors,
)
from edge.inference.engine_cache import (
    EngineKey,
    PlanCache,
    PlanRejected,
    engine_cache_key,
    engine_cache_path,
)

__all__ = [
    "TensorRTBackend",
    "HostDeviceBuffer",
    "EngineKey",
    "engine_cache_key",
    "engine_cache_path",
    "tensorrt_available",
    "engine_key",
    "build_engine",
    "network_flags",
    "parser_errors",
    "TRT_API_USED",
    "CUDART_API_USED",
]

_log = logging.getLogger(__name__)

#: Every TensorRT name used by this backend and by :mod:`~edge.inference.backends.tensorrt_build`
#: (so by ``medge build``), dotted from the module; tests/edge/test_tensorrt_api.py checks each
#: against the installed tensorrt. ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is required
#: on 10.x and optional from 11 (always strongly typed there): see :func:`network_flags`.
TRT_API_USED: tuple[str, ...] = (
    "__version__", "Logger", "Logger.WARNING", "nptype",
    "Builder", "Builder.create_network", "Builder.create_builder_config",
    "Builder.create_optimization_profile", "Builder.build_serialized_network",
    "NetworkDefinitionCreationFlag",
    "OnnxParser", "OnnxParser.parse", "OnnxParser.num_errors", "OnnxParser.get_error",
    "ParserError.desc", "ParserError.node", "ParserError.node_name", "ParserError.node_operator",
    "INetworkDefinition.num_layers", "INetworkDefinition.get_layer",
    "ILayer.type", "ILayer.num_outputs", "ILayer.get_output", "ITensor.dtype",
    "LayerType.QUANTIZE", "LayerType.DEQUANTIZE", "DataType.HALF",
    "MemoryPoolType.WORKSPACE", "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.add_optimization_profile", "IOptimizationProfile.set_shape",
    "Runtime", "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype", "ICudaEngine.create_execution_context",
    "TensorIOMode.INPUT", "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
)


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT, cuda-python and a CUDA device are usable here, and why not."""
    try:
        trt = import_tensorrt()
        cudart = import_cudart()
        count = check(cudart, cudart.cudaGetDeviceCount())
    except BackendUnavailableError as exc:
        return False, str(exc)
    except (RuntimeError, AttributeError, TypeError, OSError) as exc:
        return False, f"CUDA is not usable: {one_line(exc)}"
    if not count:
        return False, "no CUDA device is visible"
    return True, f"TensorRT {trt.__version__}, {count} CUDA device(s)"


def engine_key(device_id: int, *, precision: str, onnx_sha256: str, max_batch: int,
               input_chw: tuple[int, ...]) -> EngineKey:
    """The cache key of the plan this backend loads for these settings on this machine's device.

    For tools that look for a plan without building it (``medge doctor``);
    the backend computes its own key the same way.

    Raises
    ------
    BackendUnavailableError
        TensorRT or cuda-python is missing, or the device cannot be read.
    """
    trt, cudart = import_tensorrt(), import_cudart()
    try:
        props = check(cudart, cudart.cudaGetDeviceProperties(int(device_id)))
    except RuntimeError as exc:
        raise BackendUnavailableError(f"CUDA device {device_id} cannot be read: {exc}") from exc
    return _key(trt, props, int(device_id), precision=precision, onnx_sha256=onnx_sha256, max_batch=max_batch,
                input_chw=input_chw)


def _key(trt: Any, props: Any, device_id: int, *, precision: str, onnx_sha256: str, max_batch: int,
         input_chw: tuple[int, ...]) -> EngineKey:
    raw = props.name.decode("utf-8", "replace") if isinstance(props.name, bytes) else str(props.name)
    return EngineKey(gpu_name=raw.rstrip("\x00").strip(), compute_capability=(int(props.major), int(props.minor)),
                     trt_version=str(trt.__version__), precision=precision, onnx_sha256=onnx_sha256,
                     max_batch=int(max_batch), input_chw=tuple(int(v) for v in input_chw), device_id=device_id)


# --------------------------------------------------------------------------- backend
class TensorRTBackend:
    """One model as a strongly typed TensorRT engine on one GPU.

    Parameters
    ----------
    onnx_path : path-like
        The sha256-checked ONNX artifact for ``precision`` (fp32
        ``model.onnx``, fp16 ``model.fp16.onnx``, int8 ``model.int8-tensorrt.onnx``).
    onnx_sha256 : str
        Its sha256 (from the manifest): part of the cache key, and checked
        again on the bytes a build reads.
    model_name : str
        Used in the cache file name.
    precision : str
        ``fp32``, ``fp16`` or ``int8``: what the artifact holds.
    input_name : str
        The input tensor's name.
    input_chw : tuple of int
        ``(C, H, W)`` of the input.
    max_batch : int
        Largest batch; the profile and the buffers are sized for it.
    cache_dir : path-like
        Engine cache folder (:mod:`edge.inference.engine_cache`).
    device_id : int
        CUDA device ordinal.
    progress : callable, optional
        ``progress(phase)`` while a plan is awaited or built (default: systemd
        ``EXTEND_TIMEOUT_USEC``, :func:`edge.ops.systemd.build_progress`).

    Raises
    ------
    BackendUnavailableError
        TensorRT, cuda-python, a driver or a CUDA device is missing, or an
        API or CUDA call fails.
    ModelError
        The artifact cannot be built or run (``EngineBuildError`` for a
        parse or build failure, or a plan that still fails to load after one
        rebuild).
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
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()  # one context, one stream, one set of buffers: one call at a time
        self._closed = False
        self._buffers: dict[str, HostDeviceBuffer] = {}
        self._events: list[Any] = []
        self._stream: Any = None
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self.output_names: tuple[str, ...] = ()
        self.last_timings_ms: dict[str, float] = {}
        if precision not in ("fp32", "fp16", "int8"):
            raise BackendUnavailableError(f"TensorRT precision {precision!r} is not fp32, fp16 or int8.")
        ok, why = tensorrt_available()
        if not ok:
            raise BackendUnavailableError(f"The tensorrt backend cannot run here: {why}.")
        self._trt, self._cudart = import_tensorrt(), import_cudart()
        self.precision, self.max_batch, self.input_name = precision, int(max_batch), input_name
        self.device_id = int(device_id)
        self._input_chw = tuple(int(v) for v in input_chw)
        try:
            self._start(Path(onnx_path), onnx_sha256, model_name, Path(cache_dir), progress)
        except (BackendUnavailableError, ModelError):
            self._release()
            raise
        except (RuntimeError, AttributeError, TypeError, ValueError, OSError) as exc:
            self._release()
            raise BackendUnavailableError(f"The tensorrt backend cannot start: {one_line(exc)}") from exc

    # ------------------------------------------------------------ start-up
    def _start(self, onnx_path: Path, onnx_sha256: str, model_name: str, cache_dir: Path,
               progress: Callable[[str], None] | None) -> None:
        trt, cudart = self._trt, self._cudart
        if bindings_version() and bindings_version() < GIL_FREE_BINDINGS:
            _log.warning("cuda-python %s holds the GIL while a stream synchronizes; install >= 12.9.1.",
                         ".".join(map(str, bindings_version())))
        use_device(cudart, self.device_id)
        props = check(cudart, cudart.cudaGetDeviceProperties(self.device_id))
        self.key = _key(trt, props, self.device_id, precision=self.precision, onnx_sha256=onnx_sha256,
                        max_batch=self.max_batch, input_chw=self._input_chw)
        self.gpu_name = self.key.gpu_name
        total = int(getattr(props, "totalGlobalMem", 0) or 0)
        workspace = min(WORKSPACE_BYTES, total // 4) if total else WORKSPACE_BYTES
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

        def build() -> bytes:
            _log.info("Building the TensorRT engine of %s (%s) from %s; minutes on a Jetson, once.",
                      model_name, self.precision, onnx_path.name)
            return build_engine(onnx_path, precision=self.precision, input_name=self.input_name,
                                input_chw=self._input_chw,  # type: ignore[arg-type]
                                max_batch=self.max_batch, compute_capability=self.key.compute_capability,
                                workspace_bytes=workspace, onnx_sha256=onnx_sha256)

        result = PlanCache(cache_dir).load_or_build(model_name, self.key, build, self._deserialize, progress)
        self._engine, self.plan_path = result.value, result.path
        self.plan_source, self.plan_written = result.source, result.written  # cache | built | rebuilt
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailableError("TensorRT could not create an execution context (GPU memory?).")
        self._stream = check(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self._stream_handle = native_handle(self._stream)
        self._events = [check(cudart, cudart.cudaEventCreate()) for _ in range(4)]
        self._bind_io()
        _log.info("TensorRT engine %s ready (%s, %s, max batch %d, %s).", self.plan_path.name, self.gpu_name,
                  self.precision, self.max_batch, result.source if result.written else "not cached")

    def _deserialize(self, plan: bytes) -> Any:
        try:
            engine = self._runtime.deserialize_cuda_engine(plan)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise PlanRejected(one_line(exc)) from exc
        if engine is None:
            raise PlanRejected("deserialize_cuda_engine returned None (see TensorRT's log above)")
        return engine

    def _bind_io(self) -> None:
        """Check the engine's I/O, set the input to max batch, allocate and bind every tensor's buffers."""
        trt, engine, context = self._trt, self._engine, self._context
        names = [engine.get_tensor_name(i) for i in range(int(engine.num_io_tensors))]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [self.input_name]:
            raise ModelError(f"The engine's inputs are {inputs}, not [{self.input_name!r}].")
        full = (self.max_batch, *self._input_chw)
        if not context.set_input_shape(self.input_name, full):
            raise ModelError(f"Input shape {list(full)} is outside the engine's optimisation profile.")
        outs = []
        for tname in names:  # input shapes first: output shapes are known only once every input's is set
            try:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tname)))
            except TypeError as exc:
                raise BackendUnavailableError(f"Engine tensor {tname!r} has a type numpy lacks: {exc}") from exc
            shape = full if tname == self.input_name else tuple(int(d) for d in context.get_tensor_shape(tname))
            if tname != self.input_name:
                outs.append(tname)
            if any(d < 0 for d in shape):
                raise BackendUnavailableError(f"Output {tname!r} has a data-dependent shape {list(shape)}.")
            self._buffers[tname] = HostDeviceBuffer(self._cudart, shape, dtype)
            if not context.set_tensor_address(tname, self._buffers[tname].device):
                raise BackendUnavailableError(f"TensorRT refused the device address of tensor {tname!r}.")
        self.output_names = tuple(outs)

    # ------------------------------------------------------------ inference
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``[N, C, H, W]`` (N <= max_batch): H2D, execute_async_v3, D2H, one sync; float32 outputs.

        Thread-safe: calls are serialised (the context, stream and pinned
        buffers are shared) and each thread gets the backend's device made
        current first. The GIL is released while the stream is awaited.

        Raises
        ------
        BackendUnavailableError
            After :meth:`close`.
        ModelError
            A batch of the wrong shape or outside the profile, or a failed execution.
        """
        with self._lock:
            if self._closed:
                raise BackendUnavailableError("The TensorRT backend is closed.")
            use_device(self._cudart, self.device_id)
            return self._infer(batch)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        cudart, ctx, ev, stream = self._cudart, self._context, self._events, self._stream
        n = int(batch.shape[0])
        if n > self.max_batch:
            raise ValueError(f"Batch of {n} exceeds max_batch {self.max_batch}.")
        if n < 1 or tuple(batch.shape[1:]) != self._input_chw:
            raise ModelError(f"Batch shape {list(batch.shape)} does not match the engine's input.")
        inp = self._buffers[self.input_name]
        in_shape = (n, *self._input_chw)
        np.copyto(inp.host_view(in_shape), batch, casting="same_kind")
        if not ctx.set_input_shape(self.input_name, in_shape):
            raise ModelError(f"Input shape {list(in_shape)} is outside the engine's optimisation profile.")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(cudart, cudart.cudaEventRecord(ev[0], stream))
        nbytes_in = int(np.prod(in_shape)) * inp.dtype.itemsize
        check(cudart, cudart.cudaMemcpyAsync(inp.device, inp.host.ctypes.data, nbytes_in, h2d, stream))
        check(cudart, cudart.cudaEventRecord(ev[1], stream))
        if not ctx.execute_async_v3(self._stream_handle):
            raise ModelError("TensorRT execute_async_v3 failed (see TensorRT's log).")
        check(cudart, cudart.cudaEventRecord(ev[2], stream))
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.output_names:
            buf = self._buffers[name]
            shapes[name] = tuple(int(d) for d in ctx.get_tensor_shape(name))
            nbytes = int(np.prod(shapes[name])) * buf.dtype.itemsize
            check(cudart, cudart.cudaMemcpyAsync(buf.host.ctypes.data, buf.device, nbytes, d2h, stream))
        check(cudart, cudart.cudaEventRecord(ev[3], stream))
        check(cudart, cudart.cudaStreamSynchronize(stream))
        self.last_timings_ms = {
            "h2d": float(check(cudart, cudart.cudaEventElapsedTime(ev[0], ev[1]))),
            "compute": float(check(cudart, cudart.cudaEventElapsedTime(ev[1], ev[2]))),
            "d2h": float(check(cudart, cudart.cudaEventElapsedTime(ev[2], ev[3]))),
        }
        # Copy out of the pinned buffers: the next call overwrites them.
        return {n_: self._buffers[n_].host_view(shapes[n_]).astype(np.float32, copy=True) for n_ in self.output_names}

    # ------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Wait for a call in flight, then free buffers, events, the stream, the context and the engine (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Free whatever was allocated; a failing free is logged and the rest still freed."""
        self._closed = True
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        try:
            use_device(cudart, self.device_id)
            if self._stream is not None:
                check(cudart, cudart.cudaStreamSynchronize(self._stream))
        except RuntimeError as exc:
            _log.warning("TensorRT backend close: %s", exc)
        frees: list[Callable[[], Any]] = [buf.close for buf in self._buffers.values()]
        frees += [lambda e=e: check(cudart, cudart.cudaEventDestroy(e)) for e in self._events]
        if self._stream is not None:
            frees.append(lambda s=self._stream: check(cudart, cudart.cudaStreamDestroy(s)))
        for free in frees:
            try:
                free()
            except RuntimeError as exc:
                _log.warning("TensorRT backend close: %s", exc)
        self._buffers, self._events, self._stream = {}, [], None
        self._context = None  # the context before the engine it came from, the engine before its runtime
        self._engine = None
        self._runtime = None

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
