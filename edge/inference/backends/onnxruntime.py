"""The reference backend: ONNX Runtime (CPU; CUDA or TensorRT execution providers).

Which providers a session gets, with which options, is one pure function,
:func:`session_providers` (unit-tested without a GPU):

* ``cpu``: ``CPUExecutionProvider``.
* ``cuda``: ``CUDAExecutionProvider`` (``device_id``; cuDNN's heuristic
  convolution search, so a batch size first seen while serving costs no
  benchmarking run), then the CPU for any node CUDA lacks.
* ``tensorrt``: ``TensorrtExecutionProvider`` with its engine cache and
  timing cache in a folder of the engine cache that is keyed by the
  artifact's sha256 (ONNX Runtime's own cache names do not see new weights
  in an unchanged graph), ``trt_fp16_enable`` for the fp16 artifact,
  ``trt_int8_enable`` for the Q/DQ ``int8-tensorrt`` artifact (TensorRT
  refuses a Q/DQ network unless INT8 is enabled in the builder, and a
  calibration table must not be given for one), one optimization profile
  for batch 1 to ``max_batch``; then CUDA, then CPU for what TensorRT does
  not take.

ONNX Runtime lists a provider it was built with even where the libraries it
needs are missing, and then quietly runs the session on the CPU; a
TensorRT provider that cannot load raises instead. Either way this backend
raises :class:`ProviderInactiveError` unless the asked-for provider is the
session's first, and it turns off ONNX Runtime's own silent retry on the CPU.

Examples
--------
>>> from edge.inference.backends.onnxruntime import OnnxRuntimeBackend
>>> with OnnxRuntimeBackend("engines/us-lesion-seg/model.onnx") as be:  # doctest: +SKIP
...     out = be.infer(np.zeros((1, 1, 256, 256), np.float32))
...     out["logits"].shape
(1, 1, 256, 256)
>>> session_providers("cuda", "fp16", input_name="image", input_chw=(1, 256, 256), max_batch=4,
...                   cache_dir="/var/cache/medge/ort-trt", device_id=0)[0]
('CUDAExecutionProvider', {'device_id': '0', 'cudnn_conv_algo_search': 'HEURISTIC'})
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from edge.errors import BackendUnavailableError, ModelError
from edge.inference.backends import one_line

__all__ = [
    "OnnxRuntimeBackend",
    "PROVIDERS",
    "ProviderInactiveError",
    "check_precision",
    "available_providers",
    "default_threads",
    "session_providers",
    "cuda_options",
    "tensorrt_options",
    "trt_cache_folder",
]

_log = logging.getLogger(__name__)

#: config name -> ONNX Runtime execution provider
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

#: One entry of ``InferenceSession(providers=...)``: a name, or a name and its options.
ProviderEntry = Union[str, tuple[str, dict[str, str]]]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}

# ONNX Runtime error classes that say the file itself is bad (not the provider).
_ARTIFACT_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NoModel")

# Characters that would break ONNX Runtime's "name:NxCxHxW,name2:..." profile syntax.
_PROFILE_NAME = re.compile(r"^[^,:\s]+$")


class ProviderInactiveError(BackendUnavailableError):
    """The execution provider did not start here (missing library, no device).

    Every later session on the same provider would fail the same way, so
    the ``auto`` chain skips the provider's other steps.
    """


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (ORT names; not proof that they start)."""
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


# --------------------------------------------------------------------------- provider options
def cuda_options(device_id: int) -> dict[str, str]:
    """Options of the CUDA execution provider."""
    # EXHAUSTIVE (ONNX Runtime's default) benchmarks every new input shape on first use: with
    # batches of 1..max_batch that is a stall in the middle of serving, not at warm-up.
    return {"device_id": str(int(device_id)), "cudnn_conv_algo_search": "HEURISTIC"}


def tensorrt_options(
    precision: str,
    *,
    input_name: str,
    input_chw: Sequence[int],
    max_batch: int,
    cache_dir: Path | str,
    device_id: int,
) -> dict[str, str]:
    """Options of the TensorRT execution provider for one artifact.

    Parameters
    ----------
    precision : str
        What the artifact is: ``fp32`` (``model.onnx``), ``fp16``
        (``model.fp16.onnx``) or ``int8`` (the Q/DQ ``model.int8-tensorrt.onnx``).
    input_name, input_chw, max_batch
        The one input and the batch range of the optimization profile (1 to
        ``max_batch``, tuned for ``max_batch``).
    cache_dir : path-like
        Folder for ONNX Runtime's engine, profile and timing caches (see
        :func:`trt_cache_folder`).
    device_id : int
        GPU ordinal.

    Raises
    ------
    BackendUnavailableError
        An unknown precision, or an input name or shape the profile syntax cannot carry.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise BackendUnavailableError(f"TensorRT precision {precision!r} is not fp32, fp16 or int8.")
    if not _PROFILE_NAME.match(input_name or ""):
        raise BackendUnavailableError(
            f"Input name {input_name!r} cannot be given to ONNX Runtime's TensorRT provider "
            "(empty, or holds ',', ':' or whitespace)."
        )
    chw = tuple(int(v) for v in input_chw)
    if len(chw) != 3 or min(chw) < 1 or int(max_batch) < 1:
        raise BackendUnavailableError(f"Input shape {list(chw)} or max_batch {max_batch} is not a valid profile.")
    dims = "x".join(str(v) for v in chw)
    folder = os.fspath(cache_dir)
    return {
        "device_id": str(int(device_id)),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": folder,
        "trt_timing_cache_enable": "True",  # kept in trt_engine_cache_path (ORT's default)
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_int8_enable": "True" if precision == "int8" else "False",  # Q/DQ scales; no calibration table
        "trt_profile_min_shapes": f"{input_name}:1x{dims}",
        "trt_profile_opt_shapes": f"{input_name}:{int(max_batch)}x{dims}",
        "trt_profile_max_shapes": f"{input_name}:{int(max_batch)}x{dims}",
    }


def session_providers(
    provider: str,
    precision: str,
    *,
    input_name: str,
    input_chw: Sequence[int],
    max_batch: int,
    cache_dir: Path | str,
    device_id: int = 0,
) -> list[ProviderEntry]:
    """The ``providers`` list of ``InferenceSession`` for ``provider`` and an artifact of ``precision``.

    Pure: builds names and options only. The first entry is the provider
    that must be active; the others take the nodes it does not.

    Raises
    ------
    BackendUnavailableError
        An unknown provider, or options the TensorRT provider cannot take.
    """
    if provider not in PROVIDERS:
        raise BackendUnavailableError(f"Unknown ONNX Runtime provider {provider!r} (known: {', '.join(PROVIDERS)}).")
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    cuda: ProviderEntry = (PROVIDERS["cuda"], cuda_options(device_id))
    if provider == "cuda":
        return [cuda, PROVIDERS["cpu"]]
    trt = tensorrt_options(
        precision, input_name=input_name, input_chw=input_chw, max_batch=max_batch,
        cache_dir=cache_dir, device_id=device_id,
    )
    return [(PROVIDERS["tensorrt"], trt), cuda, PROVIDERS["cpu"]]


def trt_cache_folder(cache_dir: Path | str, model_name: str, onnx_sha256: str) -> Path:
    """``<cache_dir>/onnxruntime-trt/<model>-<sha256[:16]>``: one folder per artifact content."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name or "model")[:64]
    return Path(cache_dir) / "onnxruntime-trt" / f"{safe}-{onnx_sha256.lower()[:16]}"


def check_precision(provider: str, precision: str) -> None:
    """Refuse a precision that ONNX Runtime's ``provider`` has no fast kernels for.

    Raises
    ------
    BackendUnavailableError
        ``fp16`` on ``cpu``, ``int8`` on ``cuda``.
    """
    if precision == "fp16" and provider == "cpu":
        raise BackendUnavailableError(
            "fp16 needs a GPU provider (cuda or tensorrt); the CPU provider has no fast fp16 kernels."
        )
    if precision == "int8" and provider == "cuda":
        # The CUDA provider has no fused int8 kernels for Q/DQ graphs: it would dequantize and run
        # fp32 (slower than the fp32 artifact, and not the numerics the int8 gate measured).
        raise BackendUnavailableError(
            "int8 needs provider 'tensorrt' or 'cpu'; the CUDA provider has no int8 kernels for Q/DQ models."
        )


def _load_error(exc: BaseException, path: Path, ep: str) -> ModelError:
    """Translate a session-creation failure: a bad file, a provider that cannot start, or a failed step."""
    why = one_line(exc)
    if ep == PROVIDERS["cpu"] or type(exc).__name__ in _ARTIFACT_ERRORS:
        return ModelError(f"ONNX Runtime cannot load {path}: {why}")
    if type(exc) is RuntimeError:
        # The Python binding raises a bare RuntimeError when a provider's library cannot be loaded.
        return ProviderInactiveError(f"ONNX Runtime cannot start {ep}: {why}")
    return BackendUnavailableError(f"ONNX Runtime {ep} failed on {path.name}: {why}")


def _about_providers(w: warnings.WarningMessage) -> bool:
    """Whether a warning is ONNX Runtime's note that an asked-for provider is not there."""
    return issubclass(w.category, UserWarning) and "provider" in str(w.message).lower()


def _open_session(ort: Any, path: Path, so: Any, providers: list[ProviderEntry], ep: str) -> Any:
    """An ``InferenceSession`` whose first provider is ``ep``, or the reason why not."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # enable_fallback=0: ONNX Runtime would otherwise retry on the CPU, at load and at run time.
            session = ort.InferenceSession(
                str(path), sess_options=so, providers=providers, enable_fallback=0
            )
        except (_ort_errors() + (RuntimeError, OSError, ValueError)) as exc:
            raise _load_error(exc, path, ep) from exc
    active = list(session.get_providers())
    inactive = ep != PROVIDERS["cpu"] and (not active or active[0] != ep)
    said = [one_line(w.message) for w in caught if inactive and _about_providers(w)]
    for w in caught:  # give back what was only looked at (start-up may have other threads warning meanwhile)
        if not (inactive and _about_providers(w)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if inactive:
        raise ProviderInactiveError(
            f"ONNX Runtime did not start {ep} (the session would run on {', '.join(active) or 'nothing'}); "
            f"check the GPU driver and the CUDA, cuDNN and TensorRT libraries"
            f"{' (ONNX Runtime: ' + '; '.join(said) + ')' if said else ' (ONNX Runtime logs which one it could not load)'}."
        )
    return session


class OnnxRuntimeBackend:
    """One ONNX model in one ``onnxruntime.InferenceSession``.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file (already sha256-checked by :mod:`edge.inference.model`).
    precision : str
        What the artifact is (``fp32``, ``int8``, ``fp16``); it sets the
        TensorRT provider's precision flags. ``fp16`` is refused on the CPU
        provider (no fast fp16 kernels), ``int8`` on the CUDA provider (no
        int8 kernels for Q/DQ graphs).
    provider : str
        ``cpu``, ``cuda`` or ``tensorrt``. A provider that this onnxruntime
        build lacks, or that does not start, raises
        :class:`ProviderInactiveError`; there is no silent fallback to the CPU.
    device_id : int
        GPU ordinal for the GPU providers.
    intra_op_threads : int
        Threads for one operator; ``0`` uses one per available core.
    max_batch : int
        Largest batch :meth:`infer` accepts (the model's batch axis is dynamic).
    spin_us : int
        How long the intra-op threads spin for more work after a parallel
        section before they sleep (``session.intra_op.spin_duration_us``);
        0 turns spinning off. Bounded spinning keeps the threads awake
        between the parallel sections of a run (a wake-up of an idle core
        costs ~90 µs on a VM); ONNX Runtime's unbounded default burns a core
        between frames. The spinning stops when :meth:`infer`'s run returns
        (``session.force_spinning_stop``): after it, a spinning thread only
        takes the core that the post-processing and the reply need.
    input_name, input_chw : str, tuple of int
        The model's input; the TensorRT provider's optimization profile needs them.
    cache_dir : path-like
        The engine cache; the TensorRT provider keeps its engines in
        :func:`trt_cache_folder` under it.
    model_name, onnx_sha256 : str
        Name that folder (the sha256 is computed when not given).

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
        input_name: str = "",
        input_chw: Sequence[int] | None = None,
        cache_dir: Path | str = ".medge/engine-cache",
        model_name: str = "",
        onnx_sha256: str = "",
    ) -> None:
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise BackendUnavailableError(
                f"Unknown ONNX Runtime provider {provider!r} (known: {', '.join(PROVIDERS)})."
            )
        ep = PROVIDERS[provider]
        have = available_providers()
        if ep not in have:
            raise ProviderInactiveError(
                f"ONNX Runtime execution provider {ep} (provider = {provider!r}) is not available "
                f"in this onnxruntime build (available: {', '.join(have)}); install onnxruntime-gpu "
                f"or choose provider = 'cpu'."
            )
        check_precision(provider, precision)
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
            # spin inside a run, not after it: on 2 cores a thread spinning on after Run() returns
            # takes the core the reply needs (daemon - raw 0.01-0.18 ms lower p50, docs/configuration.md)
            so.add_session_config_entry("session.force_spinning_stop", "1")
        self.spin_us = int(spin_us)
        providers = self._providers(provider, input_name, input_chw, cache_dir, model_name, onnx_sha256, device_id)
        self._session = _open_session(ort, self.path, so, providers, ep)
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

    def _providers(
        self,
        provider: str,
        input_name: str,
        input_chw: Sequence[int] | None,
        cache_dir: Path | str,
        model_name: str,
        onnx_sha256: str,
        device_id: int,
    ) -> list[ProviderEntry]:
        """The session's providers; for TensorRT, with its cache folder created."""
        folder = Path(cache_dir)
        if provider == "tensorrt":
            if input_chw is None or not input_name:
                raise BackendUnavailableError("Provider 'tensorrt' needs the model's input name and shape.")
            from edge.inference.manifest import sha256_file

            folder = trt_cache_folder(cache_dir, model_name or self.path.stem, onnx_sha256 or sha256_file(self.path))
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackendUnavailableError(
                    f"Cannot create the TensorRT provider's engine cache {folder}: {exc.strerror or exc}."
                ) from exc
        return session_providers(
            provider, self.precision, input_name=input_name, input_chw=tuple(input_chw or (1, 1, 1)),
            max_batch=self.max_batch, cache_dir=folder, device_id=device_id,
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
