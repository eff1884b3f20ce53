"""The CUDA runtime as the TensorRT backend uses it: cuda-python's bindings, the current device, pinned buffers.

cuda-python's runtime bindings live in ``cuda.bindings.runtime`` (12.6.1 on,
and the only path in 13.x); 12.x before that had ``cuda.cudart``, a
trampoline that 13.0 removed. Every call returns ``(err, *values)``;
:func:`check` unpacks it and raises ``RuntimeError`` on an error code.

Two details that the bindings' history makes easy to get wrong:

* **The GIL.** From cuda-bindings 12.9.1 (and in 13.x) every call releases
  the GIL; before it, ``cudaStreamSynchronize`` held it for the whole
  inference and stalled every other Python thread: the ``tensorrt`` extras
  pin ``cuda-python>=12.9.1`` (:func:`bindings_version` tells which is
  installed).
* **A stream's handle.** TensorRT's ``execute_async_v3`` takes the
  ``cudaStream_t`` value. ``int(stream)`` gives it but is deprecated since
  12.9.1/13.0 in favour of ``cuda.bindings.utils.get_cuda_native_handle``;
  ``stream.getPtr()`` is *not* it (that is the address of the handle):
  :func:`native_handle`.

Importing this module never needs CUDA.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from importlib import metadata
from types import ModuleType
from typing import Any

import numpy as np

from edge.errors import BackendUnavailableError, ModelError

__all__ = [
    "CUDART_API_USED",
    "GIL_FREE_BINDINGS",
    "MAX_BUFFER_BYTES",
    "HostDeviceBuffer",
    "bindings_version",
    "check",
    "import_cudart",
    "native_handle",
    "use_device",
]

#: Every CUDA runtime name the TensorRT backend uses (checked by tests/edge/test_tensorrt_api.py).
CUDART_API_USED: tuple[str, ...] = (
    "cudaError_t.cudaSuccess", "cudaGetDeviceCount", "cudaSetDevice", "cudaGetDeviceProperties",
    "cudaMalloc", "cudaMallocHost", "cudaFree", "cudaFreeHost",
    "cudaMemcpyAsync", "cudaMemcpyKind.cudaMemcpyHostToDevice", "cudaMemcpyKind.cudaMemcpyDeviceToHost",
    "cudaStreamCreateWithFlags", "cudaStreamNonBlocking", "cudaStreamSynchronize", "cudaStreamDestroy",
    "cudaEventCreate", "cudaEventRecord", "cudaEventElapsedTime", "cudaEventDestroy", "cudaStream_t",
)
#: First cuda-bindings release whose calls all release the GIL.
GIL_FREE_BINDINGS = (12, 9, 1)
#: Largest single I/O buffer allocated (pinned and device each).
MAX_BUFFER_BYTES = 8 << 30

# The CUDA current device is per host thread. This records, per thread, the device last made
# current here, so a worker calls cudaSetDevice once, and again only after a backend on another
# device used the same thread.
_THREAD = threading.local()


def import_cudart() -> ModuleType:
    """cuda-python's runtime module (new path first).

    Raises
    ------
    BackendUnavailableError
        cuda-python is not installed.
    """
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailableError("cuda-python is not installed (pip install 'medge[tensorrt]').")


def bindings_version() -> tuple[int, ...]:
    """The installed cuda-bindings (or, before it existed, cuda-python) version; ``()`` if unknown."""
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return tuple(int(p) for p in metadata.version(dist).split(".")[:3] if p.isdigit())
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return ()


def check(cudart: ModuleType, result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising RuntimeError on an error code."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA runtime call failed: {getattr(err, 'name', str(err))}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def use_device(cudart: ModuleType, device_id: int) -> None:
    """Make ``device_id`` current on the calling thread (no call when it already is, by our record)."""
    if getattr(_THREAD, "device", None) != device_id:
        check(cudart, cudart.cudaSetDevice(device_id))
        _THREAD.device = device_id


def native_handle(stream: Any) -> int:
    """The ``cudaStream_t`` value of a cuda-python stream object, as TensorRT's ``execute_async_v3`` wants it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # type: ignore[import-not-found]
    except ImportError:  # cuda-python before 12.9.1: int() is the way there
        return int(stream)
    return int(get_cuda_native_handle(stream))


class HostDeviceBuffer:
    """A pinned host array and a device allocation of the same size, of any dtype (fp32, fp16, int8, bool).

    Sized by the dtype's itemsize (no ctypes type is needed, so float16
    works); use as a context manager (or call :meth:`close`): the memory is
    freed exactly once.

    Raises
    ------
    ModelError
        The buffer would exceed :data:`MAX_BUFFER_BYTES`.
    RuntimeError
        A CUDA allocation fails (nothing is left allocated).
    """

    def __init__(self, cudart: ModuleType, shape: tuple[int, ...], dtype: Any) -> None:
        self._cudart = cudart
        self._closed = True
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        count = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = count * self.dtype.itemsize
        if count < 0 or self.nbytes > MAX_BUFFER_BYTES:
            raise ModelError(f"An engine tensor of shape {list(self.shape)} ({self.dtype}) is too large to allocate.")
        alloc = max(1, self.nbytes)
        self._host_ptr = int(check(cudart, cudart.cudaMallocHost(alloc)))
        try:
            self.device = int(check(cudart, cudart.cudaMalloc(alloc)))
        except RuntimeError:
            check(cudart, cudart.cudaFreeHost(self._host_ptr))
            raise
        self._closed = False
        raw = (ctypes.c_ubyte * alloc).from_address(self._host_ptr)
        self.host: np.ndarray = np.frombuffer(raw, dtype=self.dtype, count=count).reshape(self.shape)

    def host_view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape)`` elements of the host buffer as ``shape``."""
        n = int(np.prod(shape))
        return self.host.reshape(-1)[:n].reshape(shape)

    def close(self) -> None:
        """Free the host and device memory (once)."""
        if self._closed:
            return
        self._closed = True
        self.host = np.empty(0, self.dtype)  # drop our view of the pinned memory before freeing it
        check(self._cudart, self._cudart.cudaFree(self.device))
        check(self._cudart, self._cudart.cudaFreeHost(self._host_ptr))

    def __enter__(self) -> "HostDeviceBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
