"""From spooled instances to results in the outbox (the DICOM side's worker threads).

The SCP's association threads only write the spool and call
:meth:`DicomPipeline.enqueue`. Worker threads here then, per instance:
read it, decode the frames (:mod:`edge.pixels`: photometric interpretation,
palette, rescale), run each frame (every ``frame_stride``-th of a cine)
through ``service.infer(..., source="dicom")``, and save the per-instance
result in the spool. A finaliser thread hands out series that have been
idle for ``series_idle_s``, makes the DICOM results
(:mod:`edge.egress.dicom_results`), writes them to the outbox and only then
deletes the source instances.

Failures are contained per instance: an instance that cannot be decoded or
whose model fails is moved to ``<spool>/failed/`` with the reason, counted
in ``medge_dicom_processing_failures_total{reason}``, and the rest goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from edge.egress.dicom_results import ModelInfo, SourceResult, build_results, make_overlay
from edge.egress.outbox import Outbox, get_or_create_metric
from edge.errors import DataError, MedgeError, ProtocolError
from edge.pixels import decode_frames, frame_to_array
from edge.routing import InstanceInfo, Router, SeriesAssembler, SeriesKey
from edge.spool import InstanceResult, Spool
from edge.types import InferenceService

__all__ = ["DicomPipeline", "WorkItem", "instance_info_from_file"]

_log = logging.getLogger(__name__)

_OVERLAY_MAX_FRAMES = 16


@dataclass(frozen=True)
class WorkItem:
    """One accepted instance waiting for inference."""

    path: Path
    info: InstanceInfo
    model: str


def instance_info_from_file(path: Path) -> InstanceInfo:
    """The routing attributes of a spooled file (header only)."""
    ds = dcmread(path, stop_before_pixels=True)
    return InstanceInfo(
        sop_class_uid=str(getattr(ds, "SOPClassUID", "")),
        sop_instance_uid=str(getattr(ds, "SOPInstanceUID", "")),
        modality=str(getattr(ds, "Modality", "")),
        body_part=str(getattr(ds, "BodyPartExamined", "")),
        study_instance_uid=str(getattr(ds, "StudyInstanceUID", "")),
        series_instance_uid=str(getattr(ds, "SeriesInstanceUID", "")),
        number_of_frames=int(getattr(ds, "NumberOfFrames", 1) or 1),
    )


class _ProcessingError(MedgeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DicomPipeline:
    """Worker and finaliser threads between the spool and the outbox.

    Parameters
    ----------
    spool : Spool
    service : InferenceService
        Its blocking ``infer`` is called from the worker threads only.
    router : Router
    outbox : Outbox
    model_info : callable
        ``model_info(name) -> ModelInfo`` for the result objects.
    registry : CollectorRegistry
    frame_stride : int
        Run every n-th frame of a multi-frame instance.
    series_idle_s : float
        A series is complete after this long with no new instance.
    overlay : bool
        Also write a secondary-capture overlay per processed frame (at most 16 per instance).
    workers : int
        Worker threads (each blocks in ``service.infer``).
    infer_timeout_s : float
        Per-frame timeout given to ``service.infer``.
    """

    def __init__(
        self,
        spool: Spool,
        service: InferenceService,
        router: Router,
        outbox: Outbox,
        model_info: Callable[[str], ModelInfo],
        registry: CollectorRegistry,
        frame_stride: int = 1,
        series_idle_s: float = 10.0,
        overlay: bool = False,
        workers: int = 1,
        infer_timeout_s: float = 60.0,
    ) -> None:
        self.spool = spool
        self.service = service
        self.router = router
        self.outbox = outbox
        self.model_info = model_info
        self.frame_stride = frame_stride
        self.overlay = overlay
        self.infer_timeout_s = infer_timeout_s
        self.assembler = SeriesAssembler(series_idle_s)
        self._queue: queue.Queue[WorkItem | None] = queue.Queue()
        self._stop = threading.Event()
        self._n_workers = max(1, workers)
        self._threads: list[threading.Thread] = []
        self._failures = get_or_create_metric(
            registry,
            Counter,
            "medge_dicom_processing_failures_total",
            "Accepted DICOM instances that could not be processed (moved to the spool's failed/ folder).",
            ["reason"],
        )
        self._results = get_or_create_metric(
            registry, Counter, "medge_dicom_results_total", "DICOM result objects written to the outbox.", ["kind"]
        )
        self._backlog = get_or_create_metric(
            registry, Gauge, "medge_dicom_spool_instances", "Spooled DICOM instances without a result in the outbox."
        )
        self._in_flight = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the workers and the finaliser."""
        for i in range(self._n_workers):
            t = threading.Thread(target=self._worker, name=f"medge-dicom-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._finaliser, name="medge-dicom-finaliser", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the threads; unfinished work stays in the spool for the next start."""
        self._stop.set()
        for _ in range(self._n_workers):
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout_s)
        self._threads.clear()

    def recover(self) -> int:
        """Queue every spooled instance that has no result in the outbox; returns how many."""
        n = 0
        for path in self.spool.pending_instances():
            try:
                info = instance_info_from_file(path)
            except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
                self._fail(path, None, "unreadable", f"spooled file cannot be read: {exc}")
                continue
            model = self.router.match(info)
            if model is None:
                self._fail(path, None, "unrouted", "no routing rule matches it any more")
                continue
            self.enqueue(WorkItem(path, info, model))
            n += 1
        if n:
            _log.info("Recovered %d spooled DICOM instance(s) without a result; processing them again.", n)
        return n

    def enqueue(self, item: WorkItem) -> None:
        """Hand an accepted, spooled instance to the workers (any thread)."""
        self.assembler.announce(self._key(item))
        with self._lock:
            self._in_flight += 1
            self._backlog.set(self._in_flight)
        self._queue.put(item)

    def idle(self) -> bool:
        """True when no instance is queued, in inference or waiting for its series to complete."""
        with self._lock:
            return self._in_flight == 0

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until :meth:`idle` (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _key(item: WorkItem) -> SeriesKey:
        return SeriesKey(item.info.study_instance_uid, item.info.series_instance_uid, item.model)

    def _done(self, n: int = 1) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - n)
            self._backlog.set(self._in_flight)

    def _fail(self, path: Path, key: SeriesKey | None, reason: str, message: str) -> None:
        _log.error("DICOM instance %s not processed (%s): %s", path.name, reason, message)
        self._failures.labels(reason=reason).inc()
        try:
            self.spool.quarantine(path, f"{reason}: {message}")
        except OSError as exc:
            _log.error("Cannot move %s to the failed folder: %s", path.name, exc)

    def _worker(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            key = self._key(item)
            try:
                if self.spool.load_result(item.path) is None:
                    result = self._infer_instance(item)
                    self.spool.save_result(item.path, result)
                if not self.assembler.add(key, item.path):
                    self._done()  # the same instance again (a resend) while its series is open
            except _ProcessingError as exc:
                self.assembler.forget(key)
                self._fail(item.path, key, exc.reason, str(exc))
                self._done()
            except Exception as exc:  # noqa: BLE001 - the worker's one error boundary
                _log.exception("Unexpected error processing DICOM instance %s.", item.path.name)
                self.assembler.forget(key)
                self._fail(item.path, key, "internal", repr(exc))
                self._done()

    def _infer_frame(self, image: np.ndarray, model: str):
        for attempt in range(6):
            try:
                r = self.service.infer(image, model=model, source="dicom", timeout_s=self.infer_timeout_s)
            except ProtocolError as exc:
                if exc.code == "overloaded" and not self._stop.is_set():
                    time.sleep(0.1 * 2**attempt)
                    continue
                raise _ProcessingError("model", f"model {model} failed: {exc.code}: {exc.message}") from exc
            if r.status == "ok":
                return r
            if r.status == "dropped" and not self._stop.is_set():
                time.sleep(0.1 * 2**attempt)  # shed under load: DICOM is not live, wait and try again
                continue
            raise _ProcessingError(
                "model", f"model {model} answered {r.status}: {r.error_code or ''} {r.error_message or ''}".strip()
            )
        raise _ProcessingError("model", f"model {model} kept shedding the frame (overloaded)")

    def _infer_instance(self, item: WorkItem) -> InstanceResult:
        try:
            ds = dcmread(item.path)
            frames = decode_frames(ds)
        except (InvalidDicomError, DataError, OSError, ValueError, AttributeError, KeyError) as exc:
            raise _ProcessingError("decode", f"pixel data cannot be decoded: {exc}") from exc
        numbers: list[int] = []
        masks: list[np.ndarray] = []
        boxes: list[list[dict]] = []
        version, task = "", ""
        for i in range(0, frames.shape[0], self.frame_stride):
            try:
                image = frame_to_array(ds, frames[i])
            except (DataError, ValueError, KeyError, AttributeError) as exc:
                raise _ProcessingError("decode", f"frame {i + 1} cannot be converted: {exc}") from exc
            r = self._infer_frame(image, item.model)
            version, task = r.model_version, r.task
            numbers.append(i + 1)
            if r.mask is not None:
                masks.append(np.asarray(r.mask, dtype=np.uint8))
            boxes.append([b.to_dict() for b in r.boxes])
        if not task:
            task = self.model_info(item.model).task
        return InstanceResult(
            model=item.model,
            model_version=version,
            task=task,
            frames=numbers,
            masks=np.stack(masks) if masks and len(masks) == len(numbers) else None,
            boxes=boxes,
        )

    def _finaliser(self) -> None:
        period = min(0.25, max(0.02, self.assembler.series_idle_s / 4))
        while not self._stop.wait(period):
            for series in self.assembler.due():
                try:
                    self._finalise(series.key, series.paths)
                except Exception as exc:  # noqa: BLE001 - the finaliser's one error boundary
                    _log.exception("Cannot make the DICOM results of a series (model %s).", series.key.model)
                    for p in series.paths:
                        self._fail(p, series.key, "result", repr(exc))
                finally:
                    self._done(len(series.paths))

    def _finalise(self, key: SeriesKey, paths: list[Path]) -> None:
        info = self.model_info(key.model)
        sources: list[SourceResult] = []
        kept: list[Path] = []
        for p in sorted(paths, key=lambda q: q.name):
            res = self.spool.load_result(p)
            if res is None or not p.exists():
                continue
            ds = dcmread(p, stop_before_pixels=True)
            # The result records what actually ran (version, task); the manifest gives labels.
            info = dataclasses.replace(info, version=res.model_version or info.version, task=res.task or info.task)
            sources.append(SourceResult(ds, res.frames, res.masks, res.boxes))
            kept.append(p)
        if not sources:
            return
        objects = build_results(sources, info)
        if self.overlay:
            objects.extend(self._overlays(kept, sources, info))
        for obj in objects:
            self.outbox.put(obj)
            self._results.labels(kind=str(obj.Modality)).inc()
        self.spool.remove_instances(kept)
        _log.info(
            "Series through %s complete: %d instance(s) -> %d result object(s) in the outbox.",
            key.model, len(kept), len(objects),
        )

    def _overlays(self, paths: list[Path], sources: list[SourceResult], info: ModelInfo) -> list:
        out = []
        for p, src in zip(paths, sources):
            full = dcmread(p)
            frames = decode_frames(full)
            for idx, number in enumerate(src.frames[:_OVERLAY_MAX_FRAMES]):
                pixels = frame_to_array(full, frames[number - 1])
                out.append(make_overlay(src.dataset, pixels, src, idx, info))
        return out
