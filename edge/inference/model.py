"""The model registry: manifests -> verified artifacts -> warmed-up backends.

A :class:`LoadedModel` is one model ready to serve: its manifest, a backend
(:mod:`edge.inference.backends`) and the manifest-driven pre- and post-processing.
:meth:`LoadedModel.run` takes a list of images (any size, dtype ``uint8``,
``uint16``, ``int16`` or ``float32``, ``[H, W]`` or ``[H, W, C]``) and
returns one :class:`~edge.types.InferenceResult` per image, with a mask at
the image's resolution (segmentation) or boxes in its pixel coordinates
(detection) and per-stage timings in microseconds.

:class:`ModelRegistry` holds every served model of a configuration.

The module is usable on its own (clients, benchmarks, notebooks):

Examples
--------
>>> import numpy as np
>>> from edge.inference.model import load_model
>>> with load_model("us-lesion-seg") as model:  # doctest: +SKIP
...     [res] = model.run([np.zeros((480, 640), np.uint8)])
...     res.status, res.mask.shape, sorted(res.timing_us)
('ok', (480, 640), ['infer', 'postprocess', 'preprocess', 'total'])
>>> with load_model("us-lesion-seg") as model:  # doctest: +SKIP
...     x, geom = model.preprocess(np.zeros((480, 640), np.uint8))
...     outputs = model.backend.infer(x[None])      # the raw backend, e.g. for benchmarks
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from edge.config import MedgeConfig, ModelConfig
from edge.errors import BackendUnavailableError, DataError, ModelError
from edge.inference.backends import create_backend
from edge.inference.chain import Step, plan, select
from edge.inference.manifest import Manifest, default_engines_dir
from edge.inference.postprocess import (
    class_heatmap,
    classify,
    decode_detections,
    segmentation_mask,
    segmentation_probability,
)
from edge.inference.preprocess import Geometry, preprocess
from edge.types import Backend, InferenceResult

__all__ = ["LoadedModel", "ModelRegistry", "load_model", "resolve_precision"]

_log = logging.getLogger(__name__)


_NO_EXTRAS: frozenset[str] = frozenset()


def _us(t0: int, t1: int) -> int:
    return max(0, (t1 - t0) // 1000)


def resolve_precision(requested: str, manifest: Manifest, kind: str, provider: str) -> str:
    """The first precision tried for a request of ``fp32``/``int8``/``fp16``/``auto`` on one runtime.

    ``auto``: on TensorRT (native, or ONNX Runtime's TensorRT provider) int8
    when the manifest has a Q/DQ int8 artifact with symmetric int8
    activations (see :attr:`edge.inference.manifest.Manifest.int8_tensorrt_ready`),
    else fp16 when it has an fp16 artifact, else fp32; on ONNX Runtime's CUDA
    provider fp16 when present, else fp32; on the CPU int8 when present (the
    trainer only writes int8 behind an accuracy gate), else fp32. When that
    precision fails to start, :func:`load_model` steps down
    (:mod:`edge.inference.chain`).

    Raises
    ------
    ModelError
        An explicitly requested precision has no artifact.
    BackendUnavailableError
        The runtime cannot run it (int8 on TensorRT without a symmetric int8
        artifact, fp16 on the CPU, int8 on CUDA).
    """
    return plan(manifest, kind, provider or "cpu", requested)[0].precision


class LoadedModel:
    """One model, loaded on a backend, with its manifest's pre/post-processing.

    Use :func:`load_model` or :class:`ModelRegistry` to make one. Thread
    safety: :meth:`run` may be called from several threads (the scheduler's
    workers): ONNX Runtime sessions are thread-safe, the TensorRT backend
    serialises its calls.

    Attributes
    ----------
    manifest : Manifest
    backend : Backend
    precision : str
        What actually runs (``auto`` resolved).
    backend_label : str
        ``onnxruntime``, ``onnxruntime+cuda``, ``tensorrt``... (for metrics).
    fallback : str
        Why the steps before the one that runs did not start, ``"; "``-joined
        (empty when the first choice runs; see :mod:`edge.inference.chain`).
    failed_steps : tuple of str
        Those steps' short labels (``tensorrt/int8``, or ``tensorrt`` for a
        runtime that cannot start here at all), in order.
    threshold : float
        The score / probability threshold in use.
    """

    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        *,
        backend_label: str = "",
        fallback: str = "",
        failed_steps: Sequence[str] = (),
        threshold: float | None = None,
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.precision = backend.precision
        self.backend_label = backend_label or backend.name
        self.fallback = fallback
        self.failed_steps = tuple(failed_steps)
        post = manifest.postprocessing
        if threshold is not None and threshold >= 0:
            post = dataclasses.replace(post, threshold=float(threshold))
        self.postprocessing = post
        self.warm = False

    # ----------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        """The model's name (from its manifest)."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The model's version (from its manifest)."""
        return self.manifest.version

    @property
    def task(self) -> str:
        """``segmentation``, ``detection`` or ``classification``."""
        return self.manifest.task

    @property
    def extra_outputs(self) -> frozenset[str]:
        """What of :data:`edge.types.EXTRA_OUTPUTS` this model can produce when asked.

        ``probability`` for segmentation; ``heatmap`` for classification
        when the model has a ``cam`` output; nothing for detection.
        """
        if self.task == "segmentation":
            return frozenset({"probability"})
        if self.task == "classification" and "cam" in self.manifest.outputs:
            return frozenset({"heatmap"})
        return frozenset()

    @property
    def max_batch(self) -> int:
        """Largest batch the backend accepts."""
        return int(self.backend.max_batch)

    @property
    def threshold(self) -> float:
        """Score / probability threshold of the post-processing."""
        return self.postprocessing.threshold

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one model input."""
        return (self.manifest.input.channels, *self.manifest.input.size)

    # ----------------------------------------------------------------- stages
    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """One image to a ``[C, H, W]`` float32 input and its geometry."""
        return preprocess(image, self.manifest.input, self.manifest.preprocessing)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The backend on one ``[N, C, H, W]`` batch (N <= ``max_batch``)."""
        return self.backend.infer(batch)

    def postprocess(
        self, outputs: Mapping[str, np.ndarray], index: int, geom: Geometry, want: frozenset[str] = frozenset()
    ) -> InferenceResult:
        """Item ``index`` of a batch's outputs to an ``ok`` result at the source size (no timings).

        ``want`` lists the extra outputs to compute (``heatmap``,
        ``probability``); those this model cannot produce are ignored.
        A classification whose logits are not finite is an ``internal`` error.
        """
        post = self.postprocessing
        res = InferenceResult(status="ok", model=self.name, model_version=self.version, task=self.task)
        if self.task == "segmentation":
            logits = outputs[self.manifest.outputs[0]][index]
            res.mask = segmentation_mask(logits, geom, post.threshold)
            if "probability" in want:
                res.probability = segmentation_probability(logits, geom)
        elif self.task == "classification":
            logits = outputs["logits"][index]
            if not np.isfinite(logits).all():
                return self._error("internal", "The model's logits are not finite.")
            res.classes, res.decision, top = classify(logits, self.manifest.labels, post)
            cam = outputs.get("cam")
            if "heatmap" in want and cam is not None and np.isfinite(cam[index]).all():
                res.heatmap = class_heatmap(cam[index], res.classes[0].score, top, geom)
        else:
            res.boxes = decode_detections(
                outputs["heatmap"][index],
                outputs["size"][index],
                outputs["offset"][index],
                geom,
                post,
                self.manifest.labels,
            )
        return res

    def run(
        self, images: Sequence[np.ndarray], wants: Sequence[frozenset[str]] | None = None
    ) -> list[InferenceResult]:
        """Preprocess, infer in batches of at most ``max_batch``, postprocess.

        Parameters
        ----------
        images : sequence of numpy.ndarray
            ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``; any supported dtype.
        wants : sequence of frozenset of str, optional
            Per image, the extra outputs to compute (``heatmap``,
            ``probability``; see :attr:`extra_outputs`). ``None``: none, the
            fast path.

        Returns
        -------
        list of InferenceResult
            One per image, in order. An image that cannot be preprocessed
            gets ``status="error"`` (code ``bad_shape``) without failing the
            others. ``timing_us`` holds ``preprocess``, ``infer`` (the
            batch's), ``postprocess`` and ``total``.

        Raises
        ------
        ModelError, RuntimeError
            If the backend fails (the whole batch fails).
        """
        if wants is not None and len(wants) != len(images):
            raise ValueError(f"{len(wants)} want sets for {len(images)} images.")
        results: list[InferenceResult] = []
        step = max(1, self.max_batch)
        for start in range(0, len(images), step):
            part = None if wants is None else wants[start : start + step]
            results.extend(self._run_batch(images[start : start + step], part))
        return results

    def _run_batch(
        self, images: Sequence[np.ndarray], wants: Sequence[frozenset[str]] | None = None
    ) -> list[InferenceResult]:
        n = len(images)
        out: list[InferenceResult | None] = [None] * n
        batch = np.empty((n, *self.input_shape), dtype=np.float32)  # preprocessed in place, no stacking
        geoms: list[Geometry] = []
        slots: list[int] = []
        pre_us: list[int] = []
        for i, img in enumerate(images):
            t0 = time.perf_counter_ns()
            try:
                _, geom = preprocess(img, self.manifest.input, self.manifest.preprocessing, out=batch[len(slots)])
            except DataError as exc:
                out[i] = self._error("bad_shape", str(exc))
                continue
            geoms.append(geom)
            slots.append(i)
            pre_us.append(_us(t0, time.perf_counter_ns()))
        if slots:
            t0 = time.perf_counter_ns()
            outputs = self.backend.infer(batch[: len(slots)])
            infer_us = _us(t0, time.perf_counter_ns())
            for j, (slot, geom) in enumerate(zip(slots, geoms)):
                t1 = time.perf_counter_ns()
                res = self.postprocess(outputs, j, geom, _NO_EXTRAS if wants is None else wants[slot])
                post_us = _us(t1, time.perf_counter_ns())
                res.timing_us = {
                    "preprocess": pre_us[j],
                    "infer": infer_us,
                    "postprocess": post_us,
                    "total": pre_us[j] + infer_us + post_us,
                }
                out[slot] = res
        return [r for r in out if r is not None]

    def _error(self, code: str, message: str) -> InferenceResult:
        return InferenceResult(
            status="error",
            model=self.name,
            model_version=self.version,
            task=self.task,
            error_code=code,
            error_message=message,
        )

    def warmup(self, iterations: int = 3) -> None:
        """Run the whole pipeline on synthetic frames so the first real frame is fast.

        Runs batch 1 ``iterations`` times and one full ``max_batch`` batch
        (ONNX Runtime and TensorRT allocate per shape on first use).
        """
        rng = np.random.default_rng(0)
        h, w = self.manifest.input.size
        img = rng.integers(0, 255, size=(h * 2, w * 2), dtype=np.uint8)
        for _ in range(max(0, iterations)):
            self.run([img])
        if iterations and self.max_batch > 1:
            self.run([img] * self.max_batch)
        self.warm = True

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.name!r}, version={self.version!r}, task={self.task!r}, "
            f"backend={self.backend_label!r}, precision={self.precision!r})"
        )


def _model_dir(name_or_dir: str | Path, engines_dir: Path | str | None) -> Path:
    """The folder holding the model's ``manifest.json``: ``name_or_dir`` itself or a name under the engines."""
    p = Path(name_or_dir)
    if (p / "manifest.json").is_file():
        return p
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    directory = root / str(name_or_dir)
    if not (directory / "manifest.json").is_file():
        raise ModelError(f"No model {str(name_or_dir)!r}: {directory / 'manifest.json'} does not exist.")
    return directory


def _step_opener(manifest: Manifest, **options: object) -> Callable[[Step, Path], Backend]:
    """``open_step`` for :func:`edge.inference.chain.select`: one backend per step, sharing ``options``."""

    def open_step(step: Step, onnx_path: Path) -> Backend:
        return create_backend(
            step.kind,
            onnx_path=onnx_path,
            onnx_sha256=manifest.artifacts[step.artifact].sha256,
            model_name=manifest.name,
            precision=step.precision,
            input_name=manifest.input.name,
            input_chw=(manifest.input.channels, *manifest.input.size),
            provider=step.provider or "cpu",
            **options,  # type: ignore[arg-type]
        )

    return open_step


def load_model(
    name_or_dir: str | Path,
    *,
    engines_dir: Path | str | None = None,
    precision: str = "fp32",
    backend: str = "onnxruntime",
    provider: str = "cpu",
    max_batch: int = 8,
    cache_dir: Path | str = ".medge/engine-cache",
    device_id: int = 0,
    intra_op_threads: int = 0,
    spin_us: int = 1000,
    threshold: float | None = None,
    warmup_iterations: int = 0,
) -> LoadedModel:
    """Load one model: read its manifest, verify the artifact's sha256, build the backend.

    Parameters
    ----------
    name_or_dir : str or path
        A model name under ``engines_dir`` (default: the bundled engines) or
        a folder holding ``manifest.json``.
    precision : str
        ``fp32``, ``int8``, ``fp16`` or ``auto`` (see :func:`resolve_precision`).
    backend : str
        ``onnxruntime``, ``tensorrt`` or ``auto`` (the fallback chain of
        :mod:`edge.inference.chain`).
    provider : str
        ONNX Runtime execution provider: ``cpu``, ``cuda`` or ``tensorrt``
        (with ``backend = "auto"``, ``tensorrt`` adds ONNX Runtime's
        TensorRT provider to the chain; CUDA and CPU are always in it).
    max_batch : int
        Largest batch the backend will be given.
    spin_us : int
        ONNX Runtime: how long intra-op threads spin for work before they
        sleep (0: never); ignored by TensorRT.
    warmup_iterations : int
        Run :meth:`LoadedModel.warmup` before returning (0: don't).

    Raises
    ------
    ModelError
        No such model, a malformed manifest, a missing artifact or a sha256
        mismatch (the artifact is refused, even by ``auto``), or no step of
        the chain started.
    BackendUnavailableError
        The backend, provider or precision cannot run here.
    """
    manifest = Manifest.load(_model_dir(name_or_dir, engines_dir))
    open_step = _step_opener(
        manifest, max_batch=max_batch, cache_dir=cache_dir, device_id=device_id,
        intra_op_threads=intra_op_threads, spin_us=spin_us,
    )
    chosen = select(manifest, backend=backend, provider=provider, precision=precision, open_step=open_step)
    label = chosen.step.runtime
    model = LoadedModel(
        manifest, chosen.backend, backend_label=label, fallback=chosen.fallback,
        failed_steps=chosen.failed_steps, threshold=threshold,
    )
    if chosen.failures:  # each failure was logged with its reason as it happened
        _log.warning(
            "Model %s runs on %s (%s) after %s did not start.",
            manifest.name, label, chosen.step.precision, ", ".join(chosen.failed_steps),
        )
    if warmup_iterations:
        model.warmup(warmup_iterations)
    return model


class ModelRegistry:
    """Every served model of one configuration, by name.

    Parameters
    ----------
    models : mapping of str to LoadedModel
        Already loaded models (tests); use :meth:`from_config` in the daemon.

    Examples
    --------
    >>> from edge.config import load_config
    >>> with ModelRegistry.from_config(load_config()) as reg:  # doctest: +SKIP
    ...     reg.names()
    ('us-lesion-seg', 'xray-nodule-det')
    """

    def __init__(self, models: Mapping[str, LoadedModel] | None = None) -> None:
        self._models: dict[str, LoadedModel] = dict(models or {})

    @classmethod
    def from_config(cls, config: MedgeConfig, warmup: bool = True) -> "ModelRegistry":
        """Load (and warm up) every model in ``config.models``; all or nothing.

        Raises
        ------
        ModelError, BackendUnavailableError
            Naming the model at fault; models loaded so far are closed.
        """
        reg = cls()
        try:
            for mc in config.models:
                if mc.name in reg._models:
                    # load_config refuses this; a hand-built config must not shadow a model either.
                    raise ModelError(
                        f"Model {mc.name!r} is configured twice ({reg._models[mc.name].manifest.directory} "
                        f"and {config.model_dir(mc)}); model names must be unique."
                    )
                reg._models[mc.name] = _load_configured(config, mc, warmup)
        except (ModelError, BackendUnavailableError):
            reg.close()
            raise
        return reg

    def get(self, name: str) -> LoadedModel:
        """The model called ``name``; ``KeyError`` if it is not served."""
        return self._models[name]

    def __getitem__(self, name: str) -> LoadedModel:
        return self._models[name]

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> tuple[str, ...]:
        """Served model names, in configuration order."""
        return tuple(self._models)

    @property
    def warm(self) -> bool:
        """Whether every model is loaded and warmed up."""
        return bool(self._models) and all(m.warm for m in self._models.values())

    def close(self) -> None:
        """Close every model."""
        for m in self._models.values():
            m.close()
        self._models.clear()

    def __enter__(self) -> "ModelRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_configured(config: MedgeConfig, mc: ModelConfig, warmup: bool) -> LoadedModel:
    max_batch = mc.max_batch or config.scheduler.max_batch
    t0 = time.perf_counter()
    try:
        model = load_model(
            config.model_dir(mc),
            precision=mc.precision,
            backend=mc.backend,
            provider=mc.provider,
            max_batch=max_batch,
            cache_dir=config.engine_cache_dir,
            device_id=mc.device_id,
            intra_op_threads=mc.intra_op_threads,
            spin_us=mc.spin_us,
            threshold=mc.threshold if mc.threshold >= 0 else None,
        )
    except (ModelError, BackendUnavailableError) as exc:
        raise type(exc)(f"Model {mc.name!r}: {exc}") from exc
    if model.name != mc.name:
        model.close()
        raise ModelError(f"Model {mc.name!r}: its manifest is named {model.name!r}.")
    if warmup:
        model.warmup(mc.warmup_iterations)
    _log.info(
        "Model %s v%s ready: %s, %s, max batch %d (%.2f s).",
        model.name,
        model.version,
        model.backend_label,
        model.precision,
        max_batch,
        time.perf_counter() - t0,
    )
    return model
