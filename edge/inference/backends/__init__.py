"""Inference backends behind one small interface (:class:`edge.types.Backend`).

* :mod:`edge.inference.backends.onnxruntime`: the reference; CPU, or the CUDA /
  TensorRT execution providers when installed and chosen explicitly.
* :mod:`edge.inference.backends.tensorrt`: native TensorRT (engines built on the
  target and cached), CUDA stream, pinned buffers, async copies.

:func:`resolve_backend` picks one and :func:`create_backend` builds it.
``backend = "auto"`` tries TensorRT and falls back to ONNX Runtime (and to
its CPU provider), logging why; the
reason is shown in ``medge_model_info``.

Examples
--------
>>> from edge.inference.backends import create_backend
>>> kind, provider, why = resolve_backend("auto")  # doctest: +SKIP
>>> be = create_backend(kind, onnx_path="engines/us-lesion-seg/model.onnx",
...                          onnx_sha256="...", model_name="us-lesion-seg", precision="fp32",
...                          input_name="image", input_chw=(1, 256, 256), max_batch=4,
...                          cache_dir=".medge/engine-cache")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.errors import BackendUnavailableError
from edge.types import Backend

__all__ = ["create_backend", "resolve_backend", "BACKENDS"]

_log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")


def resolve_backend(kind: str, provider: str = "cpu") -> tuple[str, str, str]:
    """Decide which runtime and provider actually serve a model.

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
    from edge.inference.backends.onnxruntime import PROVIDERS, available_providers

    if provider not in PROVIDERS:
        raise BackendUnavailableError(f"Unknown ONNX Runtime provider {provider!r} (known: {', '.join(PROVIDERS)}).")
    if kind in ("tensorrt", "auto"):
        from edge.inference.backends.tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if ok:
            return "tensorrt", "", ""
        if kind == "tensorrt":
            raise BackendUnavailableError(f"Backend 'tensorrt' cannot run here: {why}.")
        fallbacks = [f"tensorrt unavailable: {why}"]
        if PROVIDERS[provider] not in available_providers():
            fallbacks.append(f"onnxruntime provider {provider!r} unavailable, using cpu")
            provider = "cpu"
        return "onnxruntime", provider, "; ".join(fallbacks)
    if PROVIDERS[provider] not in available_providers():
        raise BackendUnavailableError(
            f"ONNX Runtime execution provider {PROVIDERS[provider]} (provider = {provider!r}) is not "
            f"available (available: {', '.join(available_providers())}); install onnxruntime-gpu or "
            f"choose provider = 'cpu'."
        )
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

    Use :func:`resolve_backend` first to turn ``auto`` into a concrete kind.

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
    )
