"""Which runtime, provider, precision and artifact serve a model: the ``auto`` chain.

A *step* is one way to run a model: a runtime (native TensorRT, or ONNX
Runtime with one execution provider), a precision, and the manifest artifact
for that precision on that runtime. :func:`plan` lists the steps a
configuration allows, best first, leaving out those the manifest has no
artifact for; :func:`select` tries them until one starts.

``backend = "auto"`` with ``precision = "auto"`` tries, in order:

1. ``tensorrt/int8`` (the Q/DQ ``int8-tensorrt`` artifact),
   ``tensorrt/fp16`` (``model.fp16.onnx``), ``tensorrt/fp32`` (``model.onnx``);
2. only with ``provider = "tensorrt"``: ``onnxruntime+tensorrt`` int8, fp16,
   fp32 (the same artifacts, through ONNX Runtime's TensorRT provider);
3. ``onnxruntime+cuda/fp16``, ``onnxruntime+cuda/fp32`` (the CUDA provider
   has no int8 kernels for Q/DQ graphs);
4. ``onnxruntime/int8`` (the CPU-fast ``model.int8.onnx``), ``onnxruntime/fp32``.

An explicit precision keeps only its own steps. An explicit backend keeps
only its runtime (``onnxruntime`` with its ``provider``); with
``precision = "auto"`` it still steps down through that runtime's precisions.

How failures are handled:

* A runtime that cannot start here at all (:func:`runtime_available` says
  no, or a provider that does not come up:
  :class:`~edge.inference.backends.onnxruntime.ProviderInactiveError`) is one
  failure; its remaining steps are skipped.
* Any other :class:`~edge.errors.BackendUnavailableError` or
  :class:`~edge.errors.ModelError` from building a backend fails that step
  only (the TensorRT backend raises nothing else, by contract).
* Each failure is logged on one line and kept in :attr:`Selection.failures`;
  :class:`~edge.inference.model.LoadedModel` shows them (``fallback``,
  ``failed_steps``).
* An explicit backend that cannot start, or an explicit backend and
  precision whose one step fails, raises that error unchanged: a clear
  start-up error, never a quiet fallback.
* Artifact integrity is never skipped: a missing file or a sha256 mismatch
  of the artifact a step needs stops the load.

Examples
--------
>>> from edge.inference.manifest import Manifest, default_engines_dir
>>> m = Manifest.load(default_engines_dir() / "us-lesion-seg")  # doctest: +SKIP
>>> [str(s) for s in plan(m, "auto", "cpu", "auto")]  # doctest: +SKIP
['tensorrt/int8', 'tensorrt/fp16', 'tensorrt/fp32', 'onnxruntime+cuda/fp16',
 'onnxruntime+cuda/fp32', 'onnxruntime/int8', 'onnxruntime/fp32']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from edge.errors import BackendUnavailableError, ModelError
from edge.inference import backends
from edge.inference.backends import one_line
from edge.inference.backends.onnxruntime import PROVIDERS, ProviderInactiveError, check_precision
from edge.inference.manifest import PRECISIONS, Manifest
from edge.types import Backend

__all__ = ["Step", "Failure", "Selection", "plan", "select", "step_for", "runtime_label", "runtimes"]

_log = logging.getLogger(__name__)

#: Precisions a runtime tries for ``precision = "auto"``, best first.
PRECISION_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("tensorrt", ""): ("int8", "fp16", "fp32"),
    ("onnxruntime", "tensorrt"): ("int8", "fp16", "fp32"),
    ("onnxruntime", "cuda"): ("fp16", "fp32"),
    ("onnxruntime", "cpu"): ("int8", "fp32"),
}

OpenStep = Callable[["Step", Path], Backend]
Available = Callable[[str, str], "tuple[bool, str]"]


def runtime_label(kind: str, provider: str) -> str:
    """``tensorrt``, ``onnxruntime`` (CPU) or ``onnxruntime+<provider>``: the metric's ``backend`` label."""
    if kind == "tensorrt":
        return "tensorrt"
    return "onnxruntime" if provider in ("", "cpu") else f"onnxruntime+{provider}"


@dataclass(frozen=True)
class Step:
    """One way to run a model: runtime, provider (``""`` for native TensorRT), precision, artifact key."""

    kind: str
    provider: str
    precision: str
    artifact: str

    @property
    def runtime(self) -> str:
        """The runtime's label (:func:`runtime_label`)."""
        return runtime_label(self.kind, self.provider)

    def __str__(self) -> str:
        return f"{self.runtime}/{self.precision}"


@dataclass(frozen=True)
class Failure:
    """A step (``tensorrt/int8``) or a whole runtime (``tensorrt``) that did not start, and why (one line)."""

    what: str
    reason: str
    whole_runtime: bool = False

    def __str__(self) -> str:
        return f"{self.what} {'unavailable' if self.whole_runtime else 'failed'}: {self.reason}"


@dataclass(frozen=True)
class Selection:
    """The step that runs, its backend, and what failed before it."""

    step: Step
    backend: Backend
    failures: tuple[Failure, ...] = ()

    @property
    def fallback(self) -> str:
        """Every failure, ``"; "``-joined (empty when the first step ran)."""
        return "; ".join(str(f) for f in self.failures)

    @property
    def failed_steps(self) -> tuple[str, ...]:
        """The failed steps and runtimes, in order (short labels, fit for a metric label)."""
        return tuple(f.what for f in self.failures)


def runtimes(backend: str, provider: str) -> list[tuple[str, str]]:
    """The ``(kind, provider)`` runtimes a configuration allows, best first.

    Raises
    ------
    BackendUnavailableError
        An unknown backend or provider name.
    """
    if provider not in PROVIDERS:
        raise BackendUnavailableError(f"Unknown ONNX Runtime provider {provider!r} (known: {', '.join(PROVIDERS)}).")
    if backend == "tensorrt":
        return [("tensorrt", "")]
    if backend == "onnxruntime":
        return [("onnxruntime", provider)]
    if backend != "auto":
        raise BackendUnavailableError(f"Unknown backend {backend!r} (known: onnxruntime, tensorrt, auto).")
    ort_trt = [("onnxruntime", "tensorrt")] if provider == "tensorrt" else []
    return [("tensorrt", ""), *ort_trt, ("onnxruntime", "cuda"), ("onnxruntime", "cpu")]


def step_for(manifest: Manifest, kind: str, provider: str, precision: str) -> Step:
    """The step that runs ``precision`` on one runtime.

    Raises
    ------
    ModelError
        An unknown precision, or the manifest has no artifact for it there.
    BackendUnavailableError
        The runtime cannot run that precision (int8 on TensorRT without a
        symmetric int8 artifact, fp16 on the CPU, int8 on CUDA).
    """
    if precision not in PRECISIONS:
        raise ModelError(f"Precision {precision!r} is not fp32, int8, fp16 or auto.")
    provider = "" if kind == "tensorrt" else provider
    key = manifest.artifact_key(precision, kind, provider)
    if key not in manifest.artifacts:
        raise ModelError(
            f"Model {manifest.name!r} has no {precision!r} artifact "
            f"(it has: {', '.join(sorted(manifest.artifacts))}); choose another precision."
        )
    on_tensorrt = kind == "tensorrt" or provider == "tensorrt"
    if on_tensorrt and precision == "int8" and not manifest.int8_tensorrt_ready:
        quant = manifest.training.get("quantization", {})
        acts = quant.get("activations", "unknown") if isinstance(quant, Mapping) else "unknown"
        raise BackendUnavailableError(
            f"Model {manifest.name!r}: its int8 artifact has {acts} activations; TensorRT needs "
            f"symmetric int8 (zero point 0). Run: medge quantize {manifest.name} --activations int8"
        )
    if kind == "onnxruntime":
        check_precision(provider, precision)
    return Step(kind, provider, precision, key)


def plan(manifest: Manifest, backend: str, provider: str, precision: str) -> list[Step]:
    """Every step a configuration allows for ``manifest``, best first.

    Steps the manifest has no artifact for, or the runtime cannot run, are
    left out (logged at debug level).

    Raises
    ------
    ModelError, BackendUnavailableError
        No step is left: the first reason (for an explicit backend and
        precision, the reason of its one step).
    """
    steps: list[Step] = []
    errors: list[ModelError] = []
    for kind, prov in runtimes(backend, provider):
        order = PRECISION_ORDER[(kind, prov)] if precision == "auto" else (precision,)
        for prec in order:
            try:
                steps.append(step_for(manifest, kind, prov, prec))
            except ModelError as exc:  # BackendUnavailableError is one too
                _log.debug("Model %s: no step %s/%s: %s", manifest.name, runtime_label(kind, prov), prec, exc)
                errors.append(exc)
    if not steps:
        raise errors[0]
    return steps


def select(
    manifest: Manifest,
    *,
    backend: str,
    provider: str,
    precision: str,
    open_step: OpenStep,
    available: Available | None = None,
) -> Selection:
    """Try the steps of :func:`plan` in order; the first that starts serves the model.

    Parameters
    ----------
    manifest : Manifest
    backend, provider, precision : str
        As configured (``backend`` and ``precision`` may be ``auto``).
    open_step : callable
        ``open_step(step, artifact_path) -> Backend``; raises
        :class:`~edge.errors.BackendUnavailableError` or
        :class:`~edge.errors.ModelError` when the step cannot run.
    available : callable, optional
        ``available(kind, provider) -> (ok, why)`` (``provider`` is ``""`` for
        native TensorRT); default
        :func:`edge.inference.backends.runtime_available`.

    Returns
    -------
    Selection

    Raises
    ------
    BackendUnavailableError
        An explicit backend cannot start here, or no step started and every
        reason was the runtime's.
    ModelError
        An artifact is missing or fails its sha256 check, an explicit step
        failed, or no step started.
    """
    steps = plan(manifest, backend, provider, precision)
    check = available or backends.runtime_available
    explicit_backend = backend != "auto"
    single = explicit_backend and precision != "auto"
    down: dict[str, str] = {}  # runtime label -> why it cannot start
    checked: set[str] = set()
    failures: list[Failure] = []
    errors: list[ModelError] = []
    paths: dict[str, Path] = {}
    for step in steps:
        if step.runtime not in checked:
            checked.add(step.runtime)
            ok, why = check(step.kind, step.provider)
            if not ok:
                if explicit_backend:
                    raise BackendUnavailableError(_unavailable_message(step, why))
                down[step.runtime] = _reason(why)
                _record(manifest, failures, Failure(step.runtime, down[step.runtime], whole_runtime=True))
                errors.append(BackendUnavailableError(why))
        if step.runtime in down:
            continue
        if step.artifact not in paths:  # integrity: ModelError here stops the load
            paths[step.artifact] = manifest.artifact_path(step.artifact, verify=True)
        try:
            be = open_step(step, paths[step.artifact])
        except ModelError as exc:  # BackendUnavailableError and EngineBuildError are ModelErrors
            if single:
                raise
            errors.append(exc)
            if isinstance(exc, ProviderInactiveError):
                down[step.runtime] = _reason(exc)
                _record(manifest, failures, Failure(step.runtime, down[step.runtime], whole_runtime=True))
            else:
                _record(manifest, failures, Failure(str(step), _reason(exc)))
            continue
        return Selection(step, be, tuple(failures))
    raise _exhausted(manifest, backend, precision, failures, errors)


def _reason(text: object) -> str:
    """One line, without the closing full stop (the failure's sentence adds its own)."""
    line = one_line(text)
    return line[:-1] if line.endswith(".") and not line.endswith("...") else line


def _record(manifest: Manifest, failures: list[Failure], failure: Failure) -> None:
    """Keep a failure and log it (one line, no patient data: nothing is loaded from a patient yet)."""
    failures.append(failure)
    _log.warning("Model %s: %s.", manifest.name, failure)


def _unavailable_message(step: Step, why: str) -> str:
    """The start-up error for an explicitly chosen runtime that cannot start here."""
    if step.kind == "tensorrt":
        return f"Backend 'tensorrt' cannot run here: {why}."
    return f"{why.rstrip('.')}."


def _exhausted(
    manifest: Manifest, backend: str, precision: str, failures: list[Failure], errors: list[ModelError]
) -> ModelError:
    """The error when no step started: BackendUnavailableError if every reason was the runtime's."""
    cls = BackendUnavailableError if all(isinstance(e, BackendUnavailableError) for e in errors) else ModelError
    tried = "; ".join(str(f) for f in failures) or "no step"
    return cls(
        f"Model {manifest.name!r} cannot run here (backend = {backend!r}, precision = {precision!r}): {tried}."
    )
