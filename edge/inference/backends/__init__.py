"""Inference backends behind one small interface (:class:`edge.types.Backend`).

* :mod:`edge.inference.backends.onnxruntime`: the reference; CPU, or the CUDA /
  TensorRT execution providers of ``onnxruntime-gpu``.
* :mod:`edge.inference.backends.tensorrt`: native TensorRT (engines built on the
  target and cached), CUDA stream, pinned buffers, async copies.

:func:`runtime_available` says whether a runtime can start here at all (cheap,
nothing is loaded), :func:`create_backend` builds one. Which runtime, provider
and artifact serve a model, and the ``backend = "auto"`` fallback chain, are
decided in :mod:`edge.inference.chain`. :func:`resolve_backend` is the older,
coarse form of the same question (kept for callers that only need a kind).

Examples
--------
>>> from edge.inference.backends import create_backend, runtime_available
>>> runtime_available("onnxruntime", "cpu")
(True, '')
>>> be = create_backend("onnxruntime", onnx_path="engines/us-lesion-seg/model.onnx",
...                     onnx_sha256="...", model_name="us-lesion-seg", precision="fp32",
...                     input_name="image", input_chw=(1, 256, 256), max_batch=4,
...                     cache_dir=".medge/engine-cache")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.errors import BackendUnavailableError
from edge.types import Backend

__all__ = ["create_backend", "resolve_backend", "runtime_available", "one_line", "BACKENDS", "REASON_CHARS"]

_log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")

#: Longest reason (one line) kept from a runtime's error message.
REASON_CHARS = 300


def one_line(text: object, limit: int = REASON_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters (runtime errors span many lines)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: max(0, limit - 3)] + "..."


def runtime_available(kind: str, provider: str = "cpu") -> tuple[bool, str]:
    """Whether a runtime can start here at all, and why not (a sentence).

    Parameters
    ----------
    kind : str
        ``tensorrt`` (native) or ``onnxruntime``.
    provider : str
        ONNX Runtime execution provider (``cpu``, ``cuda``, ``tensorrt``);
        ignored for native TensorRT.

    Returns
    -------
    ok, why : bool, str
        ``why`` is empty when ``ok``.

    Raises
    ------
    BackendUnavailableError
        ``kind`` or ``provider`` is not a known name.

    Notes
    -----
    ONNX Runtime lists an execution provider when its build contains it,
    even where the CUDA, cuDNN or TensorRT libraries it needs are missing;
    only a session shows whether it really starts (the ONNX Runtime backend
    checks ``session.get_providers()``). A ``True`` here is necessary, not
    sufficient.
    """
    if kind == "tensorrt":
        from edge.inference.backends.tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        return (True, "") if ok else (False, why)
    if kind != "onnxruntime":
        raise BackendUnavailableError(f"Unknown backend {kind!r} (known: onnxruntime, tensorrt, auto).")
    from edge.inference.backends.onnxruntime import PROVIDERS, available_providers

    if provider not in PROVIDERS:
        raise BackendUnavailableError(f"Unknown ONNX Runtime provider {provider!r} (known: {', '.join(PROVIDERS)}).")
    have = available_providers()
    if PROVIDERS[provider] in have:
        return True, ""
    return False, (
        f"ONNX Runtime execution provider {PROVIDERS[provider]} (provider = {provider!r}) is not "
        f"available (available: {', '.join(have)}); install onnxruntime-gpu or choose provider = 'cpu'"
    )


def resolve_backend(kind: str, provider: str = "cpu") -> tuple[str, str, str]:
    """Decide which runtime and provider would serve a model, from availability alone.

    :func:`edge.inference.model.load_model` uses the finer chain of
    :mod:`edge.inference.chain` (which also tries each step and falls back
    when one fails to start); this is its coarse form.

    Parameters
    ----------
    kind : str
        ``onnxruntime``, ``tensorrt`` or ``auto``.
    provider : str
        ONNX Runtime execution provider (``cpu``, ``cuda``, ``tensorrt``).

    Returns
    -------
    kind, provider, fallback : str
        The concrete choice and, for ``auto``, why it fell back (else empty).

    Raises
    ------
    BackendUnavailableError
        An explicitly chosen backend or provider cannot run here.
    """
    if kind not in ("onnxruntime", "tensorrt", "auto"):
        raise BackendUnavailableError(f"Unknown backend {kind!r} (known: onnxruntime, tensorrt, auto).")
    ok, why = runtime_available("onnxruntime", provider)  # validates the provider name too
    if kind in ("tensorrt", "auto"):
        trt_ok, trt_why = runtime_available("tensorrt")
        if trt_ok:
            return "tensorrt", "", ""
        if kind == "tensorrt":
            raise BackendUnavailableError(f"Backend 'tensorrt' cannot run here: {trt_why}.")
        fallbacks = [f"tensorrt unavailable: {trt_why}"]
        if not ok:
            fallbacks.append(f"onnxruntime provider {provider!r} unavailable, using cpu")
            provider = "cpu"
        return "onnxruntime", provider, "; ".join(fallbacks)
    if not ok:
        raise BackendUnavailableError(f"{why}.")
    return "onnxruntime", provider, ""


def create_backend(
    kind: str,
    *,
    onnx_path: Path | str,
    onnx_sha256: str,
    model_name: str,
    precision: str,
    input_name: str,
    input_chw: tuple[int, int, int],
    max_batch: int,
    cache_dir: Path | str,
    provider: str = "cpu",
    device_id: int = 0,
    intra_op_threads: int = 0,
    spin_us: int = 1000,
) -> Backend:
    """Build a backend of a concrete ``kind`` (``onnxruntime`` or ``tensorrt``).

    ``onnx_path`` is the artifact for ``precision`` on that runtime
    (:meth:`edge.inference.manifest.Manifest.artifact_key`): TensorRT and
    ONNX Runtime's TensorRT provider get ``int8-tensorrt`` for int8, every
    runtime gets ``model.fp16.onnx`` for fp16.

    Raises
    ------
    BackendUnavailableError
        The backend or provider cannot run here.
    ModelError
        The artifact cannot be loaded.
    """
    if kind == "tensorrt":
        from edge.inference.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(
            onnx_path,
            onnx_sha256=onnx_sha256,
            model_name=model_name,
            precision=precision,
            input_name=input_name,
            input_chw=input_chw,
            max_batch=max_batch,
            cache_dir=cache_dir,
            device_id=device_id,
        )
    if kind != "onnxruntime":
        raise BackendUnavailableError(f"Backend {kind!r} is not a concrete backend (onnxruntime, tensorrt).")
    from edge.inference.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(
        onnx_path,
        precision=precision,
        provider=provider,
        device_id=device_id,
        intra_op_threads=intra_op_threads,
        max_batch=max_batch,
        spin_us=spin_us,
        input_name=input_name,
        input_chw=input_chw,
        cache_dir=cache_dir,
        model_name=model_name,
        onnx_sha256=onnx_sha256,
    )
