"""The scheduler: per-model bounded queues, micro-batching, overload shedding.

:class:`Scheduler` implements :class:`edge.types.InferenceService`. Ingest
sources call :meth:`Scheduler.submit` (never blocks for live sources) or
:meth:`Scheduler.infer` (blocking, for DICOM). Each model has its own queue
and worker thread(s); a worker takes whatever is waiting (up to
``max_batch``, optionally lingering ``max_delay_us`` for more), runs
preprocess -> backend -> postprocess (:meth:`edge.models.LoadedModel.run`),
and calls each frame's callback exactly once from the worker thread.

Overload policy for live sources: each stream may have at most
``stream_backlog`` frames waiting in a model's queue. A new frame beyond
that sheds the stream's **oldest** waiting frame, which is answered
``dropped`` and counted in ``medge_frames_dropped_total{reason="stream_backlog"}``:
a live viewer wants the newest frame, not a growing delay. A frame that
finds the whole queue full (many streams) is answered ``error`` /
``overloaded``. Non-live submissions (``live=False``: DICOM) are never shed;
they wait for room.

The backend releases the GIL while it computes (ONNX Runtime does), so the
ingest thread keeps receiving while a batch runs.

Examples
--------
>>> sched = Scheduler(registry, SchedulerConfig(), metrics)  # doctest: +SKIP
>>> sched.start()                                             # doctest: +SKIP
>>> res = sched.infer(image, model="us-lesion-seg", source="dicom")  # doctest: +SKIP
>>> sched.close()                                             # doctest: +SKIP
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from edge.config import ModelConfig, SchedulerConfig
from edge.errors import ProtocolError
from edge.metrics import Metrics
from edge.models import LoadedModel, ModelRegistry
from edge.types import InferenceResult, ResultCallback

__all__ = ["Scheduler", "ModelPolicy"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPolicy:
    """Queueing knobs of one model (``[scheduler]`` with per-model overrides)."""

    queue_size: int
    max_batch: int
    max_delay_us: int
    stream_backlog: int
    workers: int

    @classmethod
    def of(cls, base: SchedulerConfig, model: ModelConfig | None, model_max_batch: int) -> "ModelPolicy":
        """Combine ``[scheduler]``, a ``[[models]]`` entry and the backend's max batch."""
        mb = (model.max_batch if model and model.max_batch else base.max_batch)
        return cls(
            queue_size=model.queue_size if model and model.queue_size else base.queue_size,
            max_batch=max(1, min(mb, model_max_batch)),
            max_delay_us=model.max_delay_us if model and model.max_delay_us >= 0 else base.max_delay_us,
            stream_backlog=base.stream_backlog,
            workers=base.workers,
        )


@dataclass(eq=False)
class _Job:
    image: np.ndarray
    stream: str
    source: str
    callback: ResultCallback
    received_ns: int
    enqueued_ns: int
    live: bool
    track_e2e: bool = True
    shed: bool = False


@dataclass(eq=False)
class _ModelQueue:
    model: LoadedModel
    policy: ModelPolicy
    jobs: collections.deque[_Job] = field(default_factory=collections.deque)
    per_stream: dict[str, int] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    threads: list[threading.Thread] = field(default_factory=list)
    busy: int = 0


class Scheduler:
    """Per-model queues and workers in front of a :class:`~edge.models.ModelRegistry`.

    Parameters
    ----------
    registry : ModelRegistry
        The loaded models.
    config : SchedulerConfig
        Queue sizes, batching, backlog bound, workers.
    metrics : Metrics, optional
        Where to count frames, drops, stage times, batch sizes, queue depths.
    default_model : str
        Used when a submission names no model (default: the first served).
    model_configs : mapping, optional
        ``[[models]]`` entries by name, for per-model overrides.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        config: SchedulerConfig,
        metrics: Metrics | None = None,
        *,
        default_model: str = "",
        model_configs: Mapping[str, ModelConfig] | None = None,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._default = default_model or (registry.names()[0] if len(registry) else "")
        mcs = dict(model_configs or {})
        self._queues: dict[str, _ModelQueue] = {
            m.name: _ModelQueue(m, ModelPolicy.of(config, mcs.get(m.name), m.max_batch)) for m in registry
        }
        self._accepting = False
        self._stopping = False
        self._lock = threading.Lock()
        self._accepted = 0
        self._answered = 0

    # ----------------------------------------------------------------- InferenceService
    def models(self) -> Sequence[str]:
        """Names of the models this scheduler serves."""
        return tuple(self._queues)

    @property
    def default_model(self) -> str:
        """The model used when a submission names none."""
        return self._default

    def policy(self, model: str) -> ModelPolicy:
        """The queueing policy of ``model``."""
        return self._queues[model].policy

    def submit(
        self,
        image: np.ndarray,
        *,
        model: str | None,
        source: str,
        stream: str,
        callback: ResultCallback,
        received_ns: int | None = None,
        live: bool = True,
        track_e2e: bool = True,
    ) -> None:
        """Queue one image; ``callback`` is called exactly once, from a worker thread.

        Parameters
        ----------
        image : numpy.ndarray
            ``[H, W]`` or ``[H, W, C]``; kept by reference until answered.
        model : str or None
            A served model, or ``None`` for the default.
        source : str
            ``zmq`` or ``dicom`` (a metric label).
        stream : str
            The live stream the frame belongs to (the unit of shedding).
        callback : callable
            Receives the :class:`~edge.types.InferenceResult`.
        received_ns : int, optional
            ``time.perf_counter_ns()`` at receipt (default: now).
        live : bool
            Shed the stream's oldest frame on backlog (True) or wait for
            room in the queue (False; never shed).
        track_e2e : bool
            Observe ``medge_end_to_end_seconds`` when the result is ready;
            sources that observe it after their own egress pass False.

        Raises
        ------
        ProtocolError
            ``unknown_model`` if the model is not served, ``overloaded`` if
            the queue is full (live) or the scheduler is not accepting.
        """
        now = time.perf_counter_ns()
        name = model or self._default
        q = self._queues.get(name)
        if q is None:
            raise ProtocolError("unknown_model", f"Model {name!r} is not served (served: {', '.join(self._queues)}).")
        if not self._accepting:
            raise ProtocolError("overloaded", "The daemon is not accepting frames (starting or shutting down).")
        job = _Job(image, stream, source, callback, received_ns or now, now, live, track_e2e)
        shed: _Job | None = None
        with q.cond:
            if live:
                if q.per_stream.get(stream, 0) >= q.policy.stream_backlog:
                    shed = self._shed_oldest(q, stream)
                full = len(q.jobs) >= q.policy.queue_size
            else:
                full = self._stopping or not q.cond.wait_for(
                    lambda: len(q.jobs) < q.policy.queue_size or self._stopping, timeout=30.0
                )
                full = full or self._stopping
            if not full:
                q.jobs.append(job)
                q.per_stream[stream] = q.per_stream.get(stream, 0) + 1
                depth = len(q.jobs)
                q.cond.notify()
        if shed is not None:
            self._answer_dropped(q, shed)
        if full:
            raise ProtocolError("overloaded", f"The queue of model {name!r} is full ({q.policy.queue_size} frames).")
        with self._lock:
            self._accepted += 1
        if self._metrics is not None:
            self._metrics.child(self._metrics.frames_received, source, name).inc()
            self._metrics.child(self._metrics.queue_depth, name).set(depth)

    def infer(
        self, image: np.ndarray, *, model: str, source: str, timeout_s: float = 30.0, stream: str = ""
    ) -> InferenceResult:
        """Submit one image (never shed) and wait for its result.

        Raises
        ------
        ProtocolError
            ``unknown_model``, ``overloaded`` (not accepting), or
            ``internal`` if no result arrives within ``timeout_s``.
        """
        done = threading.Event()
        box: list[InferenceResult] = []

        def _cb(res: InferenceResult) -> None:
            box.append(res)
            done.set()

        self.submit(image, model=model, source=source, stream=stream or source, callback=_cb, live=False)
        if not done.wait(timeout_s):
            raise ProtocolError("internal", f"No result from model {model!r} within {timeout_s} s.")
        return box[0]

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "Scheduler":
        """Start the worker threads and accept frames."""
        for name, q in self._queues.items():
            for i in range(q.policy.workers):
                t = threading.Thread(target=self._worker, args=(q,), name=f"medge-{name}-{i}", daemon=True)
                q.threads.append(t)
                t.start()
        self._accepting = True
        return self

    def stop_accepting(self) -> None:
        """Refuse new frames (``overloaded``); queued frames still run."""
        self._accepting = False

    def close(self, timeout_s: float = 4.0, grace_s: float = 1.0) -> None:
        """Stop accepting, run what is queued, stop the workers.

        Frames still queued when ``timeout_s`` runs out are answered
        ``dropped`` (reason ``shutdown``) so every accepted frame is answered;
        a batch already inside the backend gets up to ``grace_s`` more.
        """
        self._accepting = False
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        for q in self._queues.values():
            with q.cond:
                q.cond.notify_all()
        for q in self._queues.values():
            for t in q.threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        for q in self._queues.values():
            with q.cond:
                left = list(q.jobs)
                q.jobs.clear()
                q.per_stream.clear()
            for job in left:
                self._answer_dropped(q, job, reason="shutdown")
        # A batch already inside the backend cannot be interrupted; give it a short grace.
        grace = time.monotonic() + grace_s
        for q in self._queues.values():
            for t in q.threads:
                t.join(timeout=max(0.0, grace - time.monotonic()))
                if t.is_alive():
                    _log.warning("Worker %s still busy at shutdown; its frames may go unanswered.", t.name)
        _log.info("Scheduler stopped: %d frames accepted, %d answered.", self._accepted, self._answered)

    @property
    def accepted(self) -> int:
        """Frames accepted so far."""
        return self._accepted

    @property
    def answered(self) -> int:
        """Frames whose callback has been called."""
        return self._answered

    def pending(self) -> int:
        """Frames accepted but not yet answered."""
        with self._lock:
            return self._accepted - self._answered

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals
    def _shed_oldest(self, q: _ModelQueue, stream: str) -> _Job | None:
        """Remove and return the oldest waiting frame of ``stream`` (caller holds the lock)."""
        for job in q.jobs:
            if job.stream == stream and job.live:
                q.jobs.remove(job)
                q.per_stream[stream] -= 1
                if not q.per_stream[stream]:
                    del q.per_stream[stream]
                job.shed = True
                return job
        return None

    def _answer_dropped(self, q: _ModelQueue, job: _Job, reason: str = "stream_backlog") -> None:
        m = q.model
        res = InferenceResult(
            status="dropped",
            model=m.name,
            model_version=m.version,
            task=m.task,
            error_code=None,
            error_message=f"shed: {reason}",
            timing_us={"queue": (time.perf_counter_ns() - job.enqueued_ns) // 1000},
        )
        if self._metrics is not None:
            self._metrics.frames_dropped.labels(model=m.name, reason=reason).inc()
        self._deliver(job, res)

    def _deliver(self, job: _Job, res: InferenceResult) -> None:
        try:
            job.callback(res)
        except Exception:  # error boundary: a broken callback must not kill the worker
            _log.exception("A result callback (source %s) raised; the result is lost.", job.source)
        with self._lock:
            self._answered += 1

    def _take(self, q: _ModelQueue) -> list[_Job] | None:
        """Block for the next micro-batch; ``None`` when stopping and empty."""
        pol = q.policy
        with q.cond:
            while not q.jobs:
                if self._stopping:
                    return None
                q.cond.wait(0.5)
            if pol.max_delay_us > 0 and len(q.jobs) < pol.max_batch and not self._stopping:
                deadline = q.jobs[0].enqueued_ns + pol.max_delay_us * 1000
                while len(q.jobs) < pol.max_batch and not self._stopping:
                    left = (deadline - time.perf_counter_ns()) / 1e9
                    if left <= 0:
                        break
                    q.cond.wait(left)
                if not q.jobs:
                    return []
            n = min(pol.max_batch, len(q.jobs))
            batch = [q.jobs.popleft() for _ in range(n)]
            for job in batch:
                q.per_stream[job.stream] -= 1
                if not q.per_stream[job.stream]:
                    del q.per_stream[job.stream]
            depth = len(q.jobs)
            q.cond.notify_all()  # wake non-live submitters waiting for room
        if self._metrics is not None:
            self._metrics.child(self._metrics.queue_depth, q.model.name).set(depth)
        return batch

    def _worker(self, q: _ModelQueue) -> None:
        model = q.model
        while True:
            batch = self._take(q)
            if batch is None:
                return
            if not batch:
                continue
            t_start = time.perf_counter_ns()
            try:
                results = model.run([j.image for j in batch])
            except Exception as exc:  # error boundary of the worker: answer every frame, keep serving
                _log.exception("Model %s failed on a batch of %d.", model.name, len(batch))
                results = [
                    InferenceResult(
                        status="error",
                        model=model.name,
                        model_version=model.version,
                        task=model.task,
                        error_code="internal",
                        error_message=f"Inference failed: {type(exc).__name__}.",
                    )
                    for _ in batch
                ]
            now = time.perf_counter_ns()
            for job, res in zip(batch, results):
                res.timing_us["queue"] = max(0, (t_start - job.enqueued_ns) // 1000)
                res.timing_us["total"] = max(0, (now - job.received_ns) // 1000)
                if self._metrics is not None and res.status == "error" and res.error_code:
                    # failures are counted before the answer leaves: a client never sees one uncounted
                    self._metrics.requests_failed.labels(source=job.source, code=res.error_code).inc()
            # answer first, then the histograms: they are not on the frame's critical path
            for job, res in zip(batch, results):
                self._deliver(job, res)
            if self._metrics is not None:
                self._observe(model.name, batch, results)

    def _observe(self, model: str, batch: list[_Job], results: list[InferenceResult]) -> None:
        m = self._metrics
        assert m is not None
        m.child(m.batch_size, model).observe(len(batch))
        for job, res in zip(batch, results):
            if res.status == "ok":
                m.observe_stages(model, res.timing_us)
            if job.track_e2e:
                m.child(m.end_to_end_seconds, job.source, model).observe(res.timing_us["total"] / 1e6)
