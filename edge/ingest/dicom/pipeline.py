"""From spooled instances to results in the outbox (the DICOM side's worker threads).

The SCP's association threads only write the spool and call
:meth:`DicomPipeline.enqueue`. Worker threads here then, per instance:
read it (bounded: :func:`edge.ingest.dicom.part10.read_spooled`), decode
the frames one at a time (:mod:`edge.ingest.dicom.pixels`: photometric
interpretation, palette, rescale), run each frame (every
``frame_stride``-th of a cine, at most ``max_frames``) through
``service.infer(..., source="dicom")``, and save the per-instance result in
the spool. A finaliser thread hands out series that have been
idle for ``series_idle_s``, makes the DICOM results
(:mod:`edge.egress.dicom.results`), writes them to the outbox and only then
deletes the source instances.

**Each processed frame is decoded once.** The worker decodes only the
frames it runs (every ``frame_stride``-th, one at a time); with overlays
on, the first :data:`OVERLAY_MAX_FRAMES` of them are saved with the
instance's result (:attr:`edge.ingest.dicom.spool.InstanceResult.display`) and the
finaliser draws the overlays on those, one instance at a time, instead of
decoding the frames again. (A result saved without them, e.g. before
overlays were switched on, falls back to decoding.)

**Classification models** save per processed frame the classes (calibrated
probabilities, best first) and the decision, with the decision threshold
the model runs with (:class:`edge.egress.dicom.classification.ClassifierInfo`);
their series become a TID 1500 SR. With overlays on, and only then, the
worker asks the service for the class activation map (``want={"heatmap"}``)
of the frames that get an overlay (the first :data:`OVERLAY_MAX_FRAMES`
processed ones) and saves the maps with the result; the overlays show them
(:func:`edge.egress.dicom.sc.make_overlay`). A frame without a map gets no
overlay.

**Bounded before decoded.** Every read of a spooled file (worker, recovery,
finaliser, overlays) first runs the same bounded scan as the SCP on the
file's bytes (:func:`edge.ingest.dicom.scan.scan_and_inflate`: inflated size, frames,
pixels per frame, the Image Pixel attributes, and the codestream header of
every compressed frame against Rows x Columns); a deflated instance is
inflated by that scan, under its cap, and pydicom is handed the inflated
bytes, so pydicom's own unbounded inflation never sees a deflate bomb.
:func:`edge.ingest.dicom.pixels.decode_frame` checks each compressed frame's header
once more on the exact bytes the decoder gets. An instance over a bound, or
with a frame whose codestream declares more than the data set's image, is
quarantined with reason ``limits``.

**Fair sharing.** The work queue
(:class:`edge.ingest.dicom.fair_queue.FairQueue`) is round-robin over
*sources* (the peer's IP address; ``recovery`` for instances recovered at
start-up), not one FIFO: each source has its own queue and the workers take
one turn from each source in rotation. A turn is one instance, or at most
:data:`FRAMES_PER_TURN` frames of a multi-frame one, whose remaining frames
wait for the source's next turn. So one association (or one peer with
several) sending a long cine or a thousand instances delays another peer's
instance by at most one turn per busy source, never by its whole backlog.

**Failures.** An instance that cannot be decoded, whose model fails, or
that is over an input bound is moved to ``<spool>/failed/`` with the
reason (never patient data), counted in
``medge_dicom_processing_failures_total{reason}``, and the rest goes on.
*Transient* errors (the service overloaded, shedding, or shutting down; a
full or failing disk while saving a result, counting an attempt or writing
the series' results to the outbox) are retried with a capped backoff (the
finaliser tries a series again ``series_idle_s`` later) and never make an
instance fail; at shutdown they leave it in the spool for the next start.
An instance whose file is gone when a worker opens it was finalised
meanwhile (a resend of it arrived while its series was being written):
its result is in the outbox, so it is done, not failed.
**Poison pills**: processing an instance (and finalising its series) is
counted durably in the spool *before* it starts
(:meth:`edge.ingest.dicom.spool.Spool.begin_attempt`) and the count is removed when its
result is saved; at start-up an instance whose count reached
``max_attempts`` — it was started that often and each time the daemon
died (an OOM kill, a crash in a decoder) — is quarantined with reason
``max_attempts`` instead of being run again. The worker and finaliser
loops catch anything unexpected at one place
(:class:`edge.ops.boundary.ErrorBoundary`, components ``dicom_pipeline`` and
``dicom_finaliser``) and keep serving.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from edge.egress.dicom.classification import ClassifiedSource, ClassifierInfo
from edge.egress.dicom.common import ModelInfo, SourceResult
from edge.egress.dicom.outbox import Outbox
from edge.egress.dicom.results import build_results
from edge.egress.dicom.sc import make_overlay
from edge.errors import DataError, MedgeError, ProtocolError
from edge.ingest.dicom.fair_queue import FairQueue
from edge.ingest.dicom.part10 import instance_info_from_file, read_spooled
from edge.ingest.dicom.pixels import FrameGeometryError, decode_frame, frame_to_array, number_of_frames
from edge.ingest.dicom.routing import PendingSeries, Router, SeriesAssembler, SeriesKey
from edge.ingest.dicom.scan import InstanceInfo, ScanLimits, SizeLimitError
from edge.ingest.dicom.spool import InstanceResult, Spool, SpoolError
from edge.ops.boundary import ErrorBoundary, LogThrottle
from edge.ops.metrics import metrics_for, zeroed
from edge.types import InferenceResult, InferenceService

__all__ = [
    "DicomPipeline",
    "WorkItem",
    "FRAMES_PER_TURN",
    "OVERLAY_MAX_FRAMES",
    "FAILURE_REASONS",
    "RETRY_STAGES",
]

_log = logging.getLogger(__name__)

#: Overlay images per instance (the first processed frames); their decoded frames are kept with its result.
OVERLAY_MAX_FRAMES = 16
#: Frames of one multi-frame instance run in one turn before other sources get theirs.
FRAMES_PER_TURN = 8
#: Values of ``medge_dicom_processing_failures_total{reason}``.
FAILURE_REASONS = ("decode", "model", "result", "unreadable", "unrouted", "internal", "limits", "max_attempts")
#: Values of ``medge_dicom_transient_retries_total{stage}``: the service overloaded or shedding
#: (``inference``), a worker's spool write (``spool``), a series' results to the outbox (``results``).
RETRY_STAGES = ("inference", "spool", "results")
#: Longest wait between two tries of a transient failure (service overloaded, disk full).
_MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class WorkItem:
    """One accepted instance waiting for inference.

    ``source`` is the fair queue's key: who sent it (the peer's IP address),
    ``recovery`` for instances found in the spool at start-up.
    """

    path: Path
    info: InstanceInfo
    model: str
    source: str = ""


@dataclass
class _Job:
    """An instance in the workers' hands, with what its earlier turns produced."""

    item: WorkItem
    ds: Dataset | None = None
    indices: list[int] = field(default_factory=list)
    done: int = 0
    numbers: list[int] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    boxes: list[list[dict]] = field(default_factory=list)
    display: list[np.ndarray] = field(default_factory=list)  # decoded frames kept for the overlays
    classes: list[list[dict]] = field(default_factory=list)  # classification: per frame, best first
    decisions: list[bool] = field(default_factory=list)
    heatmaps: list[np.ndarray] = field(default_factory=list)  # class activation maps of the overlays' frames
    want_heatmap: bool = False  # ask the service for the maps (overlays on, classification model)
    threshold: float | None = None  # the classification's decision threshold, when known
    version: str = ""
    task: str = ""
    counted: bool = False  # an attempt was begun for it (undone if it stops for a transient reason)


class _Transient(MedgeError):
    """Processing stopped for a reason that is not the instance's fault (shutdown)."""


class _Gone(MedgeError):
    """The instance's file is no longer in the spool: its series was finalised meanwhile."""


class _ProcessingError(MedgeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _kind(exc: BaseException) -> str:
    """An exception for a reason file or log line: our own messages in full, others by type only.

    medge's own errors never carry patient data; a third-party message might
    quote an element value.
    """
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, MedgeError) else type(exc).__name__


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
    limits : ScanLimits, optional
        Input bounds checked before any spooled file is decoded (default: the ``[dicom]`` defaults).
        At most ``limits.max_frames`` frames of an instance run.
    max_attempts : int
        An instance whose processing started this many times without
        finishing is quarantined at start-up (``[dicom] max_attempts``).
    device_serial_number : str, optional
        Written into every result (``[dicom] device_serial_number``; empty:
        derived from the machine id by :func:`edge.egress.dicom.common.default_device_serial`).
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
        limits: ScanLimits | None = None,
        max_attempts: int = 3,
        device_serial_number: str | None = None,
    ) -> None:
        self.spool = spool
        self.device_serial_number = device_serial_number or None
        self.service = service
        self.router = router
        self.outbox = outbox
        self.model_info = model_info
        self.frame_stride = max(1, frame_stride)
        self.overlay = overlay
        self.infer_timeout_s = infer_timeout_s
        self.limits = limits or ScanLimits()
        self.max_attempts = max(1, max_attempts)
        self.assembler = SeriesAssembler(series_idle_s)
        self._queue: FairQueue[_Job] = FairQueue()
        self._stop = threading.Event()
        self._n_workers = max(1, workers)
        self._threads: list[threading.Thread] = []
        families = metrics_for(registry).dicom
        self._failures = zeroed(families.processing_failures, FAILURE_REASONS)
        self._results = zeroed(families.results, ("SEG", "SR", "OT"))
        self._retries = zeroed(families.transient_retries, RETRY_STAGES)
        self._backlog = families.spool_instances
        self._worker_boundary = ErrorBoundary("dicom_pipeline", _log, registry)
        self._finaliser_boundary = ErrorBoundary("dicom_finaliser", _log, registry)
        self._throttle = LogThrottle(_log)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._idle_cv = threading.Condition(self._lock)
        # Heartbeats for healthy(): a busy worker's last progress (by thread id), the finaliser's last turn.
        self._busy: dict[int, float] = {}
        self._finaliser_beat = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the workers and the finaliser."""
        for i in range(self._n_workers):
            t = threading.Thread(target=self._worker, name=f"medge-dicom-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._finaliser_beat = time.monotonic()  # recover() may have taken long: count from now
        t = threading.Thread(target=self._finaliser, name="medge-dicom-finaliser", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the threads; unfinished work stays in the spool for the next start.

        Instances paused between two turns are not counted as attempts (a
        shutdown is not their fault); one still inside a worker after
        ``timeout_s`` keeps its attempt: it may be what hangs.
        """
        self._stop.set()
        left = self._queue.close()
        for t in self._threads:
            t.join(timeout_s)
        self._threads.clear()
        for job in left:
            self._undo(job)

    def recover(self) -> int:
        """Queue every spooled instance that has no result in the outbox; returns how many.

        An instance whose processing was started ``max_attempts`` times
        without finishing is quarantined (reason ``max_attempts``) instead.
        """
        n = 0
        for path in self.spool.pending_instances():
            try:
                tries = self.spool.attempts(path)
            except SpoolError as exc:
                self._fail(path, "unreadable", str(exc))
                continue
            if tries >= self.max_attempts:
                self._fail(
                    path,
                    "max_attempts",
                    f"processing was started {tries} times without finishing (the daemon crashed or was "
                    f"killed while processing it, e.g. out of memory); the limit is [dicom] max_attempts = "
                    f"{self.max_attempts}",
                )
                continue
            try:
                info = instance_info_from_file(path, self.limits)
            except (SizeLimitError, FrameGeometryError) as exc:
                self._fail(path, "limits", str(exc))
                continue
            except (DataError, OSError) as exc:
                self._fail(path, "unreadable", f"spooled file cannot be read: {_kind(exc)}")
                continue
            model = self.router.match(info)
            if model is None:
                self._fail(path, "unrouted", "no routing rule matches it any more")
                continue
            self.spool.remember(path, info.identity)  # a conflicting object must not replace it
            self.enqueue(WorkItem(path, info, model, source="recovery"))
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
        self._queue.put(_Job(item), item.source)

    def healthy(self, stall_s: float = 60.0) -> bool:
        """Whether every worker and the finaliser runs and none is stuck (for ``/readyz``).

        An idle worker (waiting for an instance) is healthy however long it
        waits. A worker with an instance in hand must make progress (a frame
        inferred, a turn finished, a transient retry) within ``stall_s`` plus
        ``infer_timeout_s`` (one frame may legitimately wait that long for the
        scheduler). The finaliser turns at least every 0.25 s, so a turn older
        than ``stall_s`` means it is stuck. False before :meth:`start` and
        after :meth:`close`.
        """
        if not self._threads or self._stop.is_set() or not all(t.is_alive() for t in self._threads):
            return False
        now = time.monotonic()
        if now - self._finaliser_beat > stall_s:
            return False
        return all(now - t0 <= stall_s + self.infer_timeout_s for t0 in list(self._busy.values()))

    def _beat(self, busy: bool = True) -> None:
        """Heartbeat of the calling worker: progress now, or (``busy=False``) back to waiting for work."""
        if busy:
            self._busy[threading.get_ident()] = time.monotonic()
        else:
            self._busy.pop(threading.get_ident(), None)

    def idle(self) -> bool:
        """True when no instance is queued, in inference or waiting for its series to complete."""
        with self._lock:
            return self._in_flight == 0

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until :meth:`idle` (True) or ``timeout_s`` passed (False); woken when work finishes."""
        with self._idle_cv:
            return self._idle_cv.wait_for(lambda: self._in_flight == 0, timeout_s)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _key(item: WorkItem) -> SeriesKey:
        return SeriesKey(item.info.study_instance_uid, item.info.series_instance_uid, item.model,
                         patient=item.info.patient_key)

    def _done(self, n: int = 1) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - n)
            self._backlog.set(self._in_flight)
            if self._in_flight == 0:
                self._idle_cv.notify_all()

    def _fail(self, path: Path, reason: str, message: str) -> None:
        _log.error("DICOM instance %s not processed (%s): %s", path.name, reason, message)
        self._failures.labels(reason=reason).inc()
        try:
            self.spool.quarantine(path, f"{reason}: {message}")
        except OSError as exc:
            _log.error("Cannot move %s to the failed folder: %s", path.name, type(exc).__name__)

    def _undo(self, job: _Job) -> None:
        """Take back the attempt of a job stopped for a transient reason."""
        if job.counted:
            job.counted = False
            try:
                self.spool.undo_attempt(job.item.path)
            except (OSError, SpoolError) as exc:
                _log.warning("Cannot take back the attempt of %s: %s", job.item.path.name, type(exc).__name__)

    def _wait_transient(self, attempt: int, exc: BaseException, what: str, stage: str) -> None:
        """Back off after a transient failure; raises _Transient when shutting down."""
        self._throttle.warning(what, "DICOM processing waits and tries again (%s): %s.", what, _kind(exc))
        self._retries.labels(stage=stage).inc()
        self._beat()  # waiting on a transient condition (full disk, overload) is not being stuck
        if self._stop.wait(min(_MAX_BACKOFF_S, 0.1 * 2**attempt)):
            raise _Transient(f"shutting down while {what}")

    def _durably(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a spool write, retrying while the disk is full or failing (transient)."""
        attempt = 0
        while True:
            try:
                return fn()
            except (OSError, SpoolError) as exc:
                self._wait_transient(attempt, exc, what, "spool")
                attempt += 1

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            key = self._key(job.item)
            self._beat()
            try:
                self._turn(job)
            except _Transient:
                self._undo(job)  # stays in the spool; the next start runs it again
            except _Gone:
                self._undo(job)
                self.assembler.forget(key)
                self._done()
            except _ProcessingError as exc:
                self.assembler.forget(key)
                self._fail(job.item.path, exc.reason, str(exc))
                self._done()
            except Exception as exc:  # noqa: BLE001 - the worker's one error boundary
                self._worker_boundary.report(exc, "processing a spooled instance")
                self.assembler.forget(key)
                self._fail(job.item.path, "internal", f"unexpected {_kind(exc)}")
                self._done()
            finally:
                self._beat(busy=False)

    def _turn(self, job: _Job) -> None:
        """Run one turn of ``job``: start it, or continue its frames; queue the rest for a later turn."""
        item = job.item
        if job.ds is None:
            if self.spool.load_result(item.path) is not None:
                self._added(item)  # processed before a restart: only its series is left to do
                return
            if not item.path.exists():
                raise _Gone(f"{item.path.name} left the spool before it was opened")
            self._durably(lambda: self.spool.begin_attempt(item.path), "counting an attempt")
            job.counted = True
            self._open(job)
        ds = job.ds
        assert ds is not None
        stop = min(len(job.indices), job.done + FRAMES_PER_TURN)
        while job.done < stop:
            i = job.indices[job.done]
            try:
                image = frame_to_array(ds, decode_frame(ds, i))
            except FrameGeometryError as exc:  # checked before decoding: nothing was allocated
                raise _ProcessingError("limits", str(exc)) from exc
            except (DataError, ValueError, KeyError, AttributeError, IndexError) as exc:
                raise _ProcessingError("decode", f"frame {i + 1} cannot be decoded: {_kind(exc)}") from exc
            overlaid = self.overlay and len(job.display) < OVERLAY_MAX_FRAMES
            if overlaid:
                job.display.append(np.array(image, copy=True))  # the service may keep or change its input
            want = frozenset({"heatmap"}) if overlaid and job.want_heatmap else frozenset()
            self._record(job, i, self._infer_frame(image, item.model, want))
            self._beat()
        if job.done < len(job.indices):
            if not self._queue.put(job, item.source, front=True):  # the rest at this source's next turn
                raise _Transient("shutting down between two turns")
            return
        result = self._instance_result(job)
        job.ds = None
        job.display, job.heatmaps = [], []
        self._durably(lambda: self.spool.save_result(item.path, result), "saving a result")
        self._durably(lambda: self.spool.clear_attempts(item.path), "clearing an attempt count")
        job.counted = False
        self._added(item)

    @staticmethod
    def _record(job: _Job, index: int, r: InferenceResult) -> None:
        """Keep what the service answered for frame ``index`` of ``job`` (mask, boxes, classes, map)."""
        job.version, job.task = r.model_version, r.task
        job.numbers.append(index + 1)
        if r.mask is not None:
            job.masks.append(np.asarray(r.mask, dtype=np.uint8))
        job.boxes.append([b.to_dict() for b in r.boxes])
        if r.classes is not None:
            job.classes.append([c.to_dict() for c in r.classes])
            job.decisions.append(bool(r.decision))
        if r.heatmap is not None and len(job.heatmaps) < OVERLAY_MAX_FRAMES:
            job.heatmaps.append(np.asarray(r.heatmap, dtype=np.uint8))
        job.done += 1

    def _instance_result(self, job: _Job) -> InstanceResult:
        """The per-instance result of a job whose every frame ran (what the spool keeps)."""
        n = len(job.numbers)
        classified = bool(job.classes) and len(job.classes) == n
        # The maps only when every overlaid frame has one (they pair with the first display frames).
        maps = job.heatmaps if job.heatmaps and len(job.heatmaps) == min(n, OVERLAY_MAX_FRAMES) else []
        return InstanceResult(
            model=job.item.model,
            model_version=job.version,
            task=job.task or self.model_info(job.item.model).task,
            frames=job.numbers,
            masks=np.stack(job.masks) if job.masks and len(job.masks) == n else None,
            boxes=job.boxes,
            display=np.stack(job.display) if job.display else None,
            classes=job.classes if classified else None,
            decisions=job.decisions if classified else None,
            threshold=job.threshold if classified else None,
            heatmaps=np.stack(maps) if maps else None,
        )

    def _open(self, job: _Job) -> None:
        """Read the job's instance (bounded) and choose its frames."""
        try:
            ds = read_spooled(job.item.path, self.limits)
        except FileNotFoundError as exc:
            raise _Gone(f"{job.item.path.name} left the spool before it was read") from exc
        except (SizeLimitError, FrameGeometryError) as exc:
            raise _ProcessingError("limits", str(exc)) from exc
        except (InvalidDicomError, DataError, OSError, ValueError, AttributeError, KeyError) as exc:
            raise _ProcessingError("decode", f"instance cannot be read: {_kind(exc)}") from exc
        n = min(number_of_frames(ds), self.limits.max_frames)
        job.ds = ds
        job.indices = list(range(0, n, self.frame_stride))
        info = self.model_info(job.item.model)
        job.want_heatmap = self.overlay and info.task == "classification"
        job.threshold = info.threshold if isinstance(info, ClassifierInfo) else None

    def _added(self, item: WorkItem) -> None:
        if not self.assembler.add(self._key(item), item.path):
            self._done()  # the same instance again (a resend) while its series is open

    def _infer_frame(self, image: np.ndarray, model: str, want: frozenset[str] = frozenset()) -> InferenceResult:
        """One frame through the service; overload and shedding are retried (never a failure).

        ``want``: the extra outputs to compute (``heatmap``); passed only when
        not empty, so the default call is the one every service takes.
        """
        attempt = 0
        while True:
            try:
                if want:
                    r = self.service.infer(image, model=model, source="dicom", timeout_s=self.infer_timeout_s,
                                           want=want)
                else:
                    r = self.service.infer(image, model=model, source="dicom", timeout_s=self.infer_timeout_s)
            except ProtocolError as exc:
                if exc.code != "overloaded":
                    raise _ProcessingError("model", f"model {model} failed: {exc.code}: {exc}") from exc
                self._wait_transient(attempt, exc, f"model {model} is overloaded", "inference")
                attempt += 1
                continue
            if r.status == "ok":
                return r
            if r.status == "dropped":  # shed under load or at shutdown: DICOM is not live, wait and retry
                self._wait_transient(attempt, _Transient("frame dropped"), f"model {model} shed a frame", "inference")
                attempt += 1
                continue
            raise _ProcessingError(
                "model", f"model {model} answered {r.status}: {r.error_code or ''} {r.error_message or ''}".strip()
            )

    def _finaliser(self) -> None:
        period = min(0.25, max(0.02, self.assembler.series_idle_s / 4))
        while not self._stop.wait(period):
            self._finaliser_beat = time.monotonic()
            try:
                for series in self.assembler.due():
                    self._finalise_series(series)
                    self._finaliser_beat = time.monotonic()  # a big study's many series: progress per series
            except Exception as exc:  # noqa: BLE001 - the finaliser's one error boundary
                self._finaliser_boundary.report(exc, "handing out complete series")

    def _finalise_series(self, series: PendingSeries) -> None:
        """Results of one complete series to the outbox; transient errors put the series back."""
        counted: list[Path] = []
        try:
            for p in series.paths:
                if p.exists():
                    self.spool.begin_attempt(p)
                    counted.append(p)
            self._finalise(series.key, series.paths)
        except (OSError, SpoolError) as exc:
            # A full or failing disk is transient: try the series again later, it is not its fault.
            for p in counted:
                try:
                    self.spool.undo_attempt(p)
                except (OSError, SpoolError):
                    pass
            self._throttle.warning(
                "finalise", "The results of a series cannot be written yet (%s); trying again later.", _kind(exc)
            )
            self._retries.labels(stage="results").inc()
            self.assembler.restore(series)
            return
        except Exception as exc:  # noqa: BLE001 - the finaliser's one error boundary
            self._finaliser_boundary.report(exc, f"making the results of a series (model {series.key.model})")
            for p in series.paths:
                self._fail(p, "result", f"its series' results cannot be made: {_kind(exc)}")
        self._done(len(series.paths))

    def _finalise(self, key: SeriesKey, paths: list[Path]) -> None:
        info = self.model_info(key.model)
        sources: list[SourceResult] = []
        kept: list[Path] = []
        for p in sorted(paths, key=lambda q: q.name):
            res = self.spool.load_result(p)
            if res is None or not p.exists():
                if p.exists():  # its result file became unreadable: never dropped, run again at the next start
                    _log.warning("The result of %s cannot be read; it stays in the spool for the next start.", p.name)
                continue  # else finalised meanwhile with the same object sent again
            ds = read_spooled(p, self.limits, stop_before_pixels=True)
            # The result records what actually ran (version, task); the manifest gives labels.
            info = dataclasses.replace(info, version=res.model_version or info.version, task=res.task or info.task)
            sources.append(_source_result(ds, res, info))
            kept.append(p)
        if not sources:
            return
        objects = build_results(sources, info, device_serial_number=self.device_serial_number)
        if self.overlay:
            objects.extend(self._overlays(kept, sources, info))
        stored_at = min(p.stat().st_mtime for p in kept)  # the earliest source's arrival in the spool
        for obj in objects:
            self.outbox.put(obj, stored_at=stored_at)
            self._results.labels(kind=str(obj.Modality)).inc()
        self.spool.remove_instances(kept)
        _log.info(
            "Series through %s complete: %d instance(s) -> %d result object(s) in the outbox.",
            key.model, len(kept), len(objects),
        )

    def _overlays(self, paths: list[Path], sources: list[SourceResult], info: ModelInfo) -> list:
        out = []
        for p, src in zip(paths, sources):
            frames = src.frames[:OVERLAY_MAX_FRAMES]
            if isinstance(src, ClassifiedSource):
                src.heatmaps = self.spool.load_heatmaps(p)  # one instance's maps in memory at a time
                frames = frames[: 0 if src.heatmaps is None else len(src.heatmaps)]  # a frame without: no overlay
                if not frames:
                    continue
            display = self.spool.load_display(p)  # one instance's frames in memory at a time
            full = None
            if display is None or len(display) < len(frames):
                full = read_spooled(p, self.limits)  # saved without its frames (e.g. overlays switched on later)
            for idx, number in enumerate(frames):
                if full is None:
                    assert display is not None
                    pixels = display[idx]
                else:
                    pixels = frame_to_array(full, decode_frame(full, number - 1))
                out.append(make_overlay(src.dataset, pixels, src, idx, info,
                                        device_serial_number=self.device_serial_number, series=sources))
            if isinstance(src, ClassifiedSource):
                src.heatmaps = None
        return out


def _source_result(ds: Dataset, res: InstanceResult, info: ModelInfo) -> SourceResult:
    """A saved per-instance result as the result objects take it (classified, or masks and boxes)."""
    if res.classes is None:
        return SourceResult(ds, res.frames, res.masks, res.boxes)
    threshold = res.threshold
    if threshold is None and isinstance(info, ClassifierInfo):
        threshold = info.threshold  # not known when it ran (an older result): the one the model runs with now
    return ClassifiedSource(ds, res.frames, None, res.boxes, classes=res.classes,
                            decisions=list(res.decisions or []), threshold=threshold)
