"""The reference backend: ONNX Runtime (CPU; CUDA or TensorRT execution providers).

Examples
--------
>>> from edge.inference.backends.onnxruntime import OnnxRuntimeBackend
>>> with OnnxRuntimeBackend("engines/us-lesion-seg/model.onnx") as be:  # doctest: +SKIP
...     out = be.infer(np.zeros((1, 1, 256, 256), np.float32))
...     out["logits"].shape
(1, 1, 256, 256)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.errors import BackendUnavailableError, ModelError

__all__ = ["OnnxRuntimeBackend", "PROVIDERS", "available_providers", "default_threads"]

_log = logging.getLogger(__name__)

#: config name -> ONNX Runtime execution provider
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (ORT names)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception classes (they derive from ``Exception`` directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(
        obj
        for obj in vars(state).values()
        if isinstance(obj, type) and issubclass(obj, Exception)
    )


def default_threads() -> int:
    """Cores this process may run on (the intra-op thread count for ``0``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeBackend:
    """One ONNX model in one ``onnxruntime.InferenceSession``.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file (already sha256-checked by :mod:`edge.inference.model`).
    precision : str
        What the artifact is (``fp32``, ``int8``, ``fp16``); reported, and
        ``fp16`` is refused on the CPU provider, where ONNX Runtime has no
        fast fp16 kernels.
    provider : str
        ``cpu``, ``cuda`` or ``tensorrt``. A provider that this onnxruntime
        build lacks raises :class:`~edge.errors.BackendUnavailableError`;
        there is no silent fallback to the CPU.
    device_id : int
        GPU ordinal for the GPU providers.
    intra_op_threads : int
        Threads for one operator; ``0`` uses one per available core.
    max_batch : int
        Largest batch :meth:`infer` accepts (the model's batch axis is dynamic).
    spin_us : int
        How long the intra-op threads spin for more work after a parallel
        section before they sleep (``session.intra_op.spin_duration_us``);
        0 turns spinning off. Bounded spinning keeps the cores awake
        through the end of a run, so the hand-offs that follow (result to
        the reply, reply to the socket) skip a wake-up of an idle core;
        ONNX Runtime's unbounded default burns a core between frames.

    Notes
    -----
    ``InferenceSession.run`` releases the GIL while it computes, so several
    worker threads (and the ZeroMQ I/O thread) run in parallel with it.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: Path | str,
        *,
        precision: str = "fp32",
        provider: str = "cpu",
        device_id: int = 0,
        intra_op_threads: int = 0,
        max_batch: int = 8,
        spin_us: int = 1000,
    ) -> None:
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise BackendUnavailableError(
                f"Unknown ONNX Runtime provider {provider!r} (known: {', '.join(PROVIDERS)})."
            )
        ep = PROVIDERS[provider]
        have = available_providers()
        if ep not in have:
            raise BackendUnavailableError(
                f"ONNX Runtime execution provider {ep} (provider = {provider!r}) is not available "
                f"in this onnxruntime build (available: {', '.join(have)}); install onnxruntime-gpu "
                f"or choose provider = 'cpu'."
            )
        if precision == "fp16" and provider == "cpu":
            raise BackendUnavailableError(
                "fp16 needs a GPU provider (cuda or tensorrt); the CPU provider has no fast fp16 kernels."
            )
        self.precision = precision
        self.provider = provider
        self.max_batch = int(max_batch)
        self.path = Path(path)
        threads = intra_op_threads or default_threads()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us > 0 else "0")
        if spin_us > 0:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(int(spin_us)))
        self.spin_us = int(spin_us)
        providers: list[object]
        if provider == "cpu":
            providers = [ep]
        else:
            providers = [(ep, {"device_id": int(device_id)}), "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except (_ort_errors() + (RuntimeError, OSError)) as exc:
            raise ModelError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        if provider != "cpu" and self._session.get_providers()[0] != ep:
            raise BackendUnavailableError(
                f"ONNX Runtime could not start {ep} for {self.path} (it chose "
                f"{self._session.get_providers()[0]}); check the GPU driver and CUDA libraries."
            )
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.path} has {len(inputs)} inputs; medge models have exactly one.")
        self.input_name: str = inputs[0].name
        self._input_type = _ORT_TYPES.get(inputs[0].type, np.float32)
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())
        self.intra_op_threads = threads
        _log.info(
            "Loaded %s on ONNX Runtime %s (%s, %s, %d threads).",
            self.path.name,
            ort.__version__,
            ep,
            precision,
            threads,
        )

    @property
    def providers(self) -> Sequence[str]:
        """The execution providers the session actually uses, in priority order."""
        return tuple(self._session.get_providers())

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch ``[N, C, H, W]`` float32; outputs by name, float32, batch first.

        Raises
        ------
        ValueError
            If the batch is larger than ``max_batch``.
        """
        if batch.shape[0] > self.max_batch:
            raise ValueError(f"Batch of {batch.shape[0]} exceeds max_batch {self.max_batch}.")
        x = np.ascontiguousarray(batch, dtype=self._input_type)
        outs = self._session.run(list(self.output_names), {self.input_name: x})
        return {
            n: (o if o.dtype == np.float32 else o.astype(np.float32))
            for n, o in zip(self.output_names, outs)
        }

    def close(self) -> None:
        """Release the session."""
        self._session = None  # type: ignore[assignment]

    def __enter__(self) -> "OnnxRuntimeBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
