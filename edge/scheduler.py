"""The scheduler: per-model bounded queues, micro-batching, overload shedding, fair sharing.

:class:`Scheduler` implements :class:`edge.types.InferenceService`. Ingest
sources call :meth:`Scheduler.submit` (never blocks for live sources) or
:meth:`Scheduler.infer` (blocking, for DICOM). Each model has its own queue
and worker thread(s); a worker takes whatever is waiting (up to
``max_batch``, optionally lingering ``max_delay_us`` for more), runs
preprocess -> backend -> postprocess (:meth:`edge.inference.model.LoadedModel.run`),
and calls each frame's callback exactly once from the worker thread.

Overload policy for live sources: each stream may have at most
``stream_backlog`` frames waiting in a model's queue. A new frame beyond
that sheds the stream's **oldest** waiting frame, which is answered
``dropped`` and counted in ``medge_frames_dropped_total{reason="stream_backlog"}``:
a live viewer wants the newest frame, not a growing delay. A frame that
finds the whole queue full (many streams) is answered ``error`` /
``overloaded``. Non-live submissions (``live=False``: DICOM) are never shed;
they wait for room.

Each queue is bounded twice, before anything more is held: in frames
(``queue_size``) and in bytes (``queue_max_mb``: the pixel bytes of the
waiting images, live and non-live together; 0 is no byte bound). A live
frame that would exceed the byte bound sheds its own stream's oldest
waiting frame(s) if that makes room (``dropped``, ``stream_backlog``), and
is answered ``overloaded`` otherwise; a non-live frame waits for room. A
single frame larger than the whole bound is still accepted into an empty
queue (it could never run otherwise).

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
from edge.inference.model import LoadedModel, ModelRegistry
from edge.ops.boundary import ErrorBoundary
from edge.ops.metrics import Metrics
from edge.types import InferenceResult, ResultCallback

__all__ = ["Scheduler", "ModelPolicy", "NONLIVE_EVERY"]

_log = logging.getLogger(__name__)

#: anti-starvation: while live frames keep a worker busy, at most this many live batches in a
#: row are taken ahead of a waiting non-live frame; then one non-live batch runs
NONLIVE_EVERY = 4
_NONLIVE_WAIT_S = 30.0  # how long a non-live submission waits for room before it is refused


@dataclass(frozen=True)
class ModelPolicy:
    """Queueing knobs of one model (``[scheduler]`` with per-model overrides)."""

    queue_size: int
    max_batch: int
    max_delay_us: int
    stream_backlog: int
    workers: int
    max_bytes: int = 0  # 0: no byte bound

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
            max_bytes=base.queue_max_mb * 1024 * 1024,
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
    nbytes: int = 0
    want: frozenset[str] = frozenset()  # extra outputs asked for (heatmap, probability)


@dataclass(eq=False)
class _ModelQueue:
    """One model's waiting frames: live and non-live apart, counted in frames and bytes."""

    model: LoadedModel
    policy: ModelPolicy
    live: collections.deque[_Job] = field(default_factory=collections.deque)
    nonlive: collections.deque[_Job] = field(default_factory=collections.deque)
    per_stream: dict[str, int] = field(default_factory=dict)  # live frames waiting, by stream
    nbytes: int = 0  # pixel bytes waiting, both deques
    live_streak: int = 0  # live batches taken in a row while a non-live frame waited
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)  # workers wait here for frames
    room: threading.Condition = field(init=False)  # non-live submitters wait here for room
    threads: list[threading.Thread] = field(default_factory=list)
    busy: int = 0

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)
        self.room = threading.Condition(self.lock)

    def __len__(self) -> int:
        return len(self.live) + len(self.nonlive)

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the byte bound (an empty queue takes any single frame)."""
        bound = self.policy.max_bytes
        return not bound or self.nbytes + nbytes <= bound or self.nbytes == 0

    def remove_live(self, job: _Job) -> None:
        """Take ``job`` out of the live deque (caller holds the lock)."""
        self.live.remove(job)
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        self.nbytes -= job.nbytes
        if job.live:
            left = self.per_stream[job.stream] - 1
            if left:
                self.per_stream[job.stream] = left
            else:
                del self.per_stream[job.stream]

    def pop(self, deque: collections.deque[_Job]) -> _Job:
        """The oldest job of ``deque`` (caller holds the lock)."""
        job = deque.popleft()
        self._forget(job)
        return job


class Scheduler:
    """Per-model queues and workers in front of a :class:`~edge.inference.model.ModelRegistry`.

    Parameters
    ----------
    registry : ModelRegistry
        The loaded models.
    config : SchedulerConfig
        Queue sizes (frames and bytes), batching, backlog bound, workers.
    metrics : Metrics, optional
        Where to count frames, drops, stage times, batch sizes, queue depths.
    default_model : str
        Used when a submission names no model (default: the first served).
    model_configs : mapping, optional
        ``[[models]]`` entries by name, for per-model overrides.

    Notes
    -----
    **Fair sharing.** Each model queue keeps live frames (ZeroMQ) and
    non-live frames (``live=False``: DICOM, through :meth:`infer`) apart, and
    a worker takes live frames first: a live stream is never queued behind
    a long DICOM cine of the same model (it waits at most for the batch
    already running). Anti-starvation rule: while live frames keep the
    worker busy and a non-live frame waits, at most :data:`NONLIVE_EVERY`
    live batches run in a row, then one non-live batch; whenever no live
    frame waits, non-live frames run at once. A batch is never mixed, and
    ``max_delay_us`` lingering applies to live batches only (a non-live
    submitter waits for its result, so nothing more would arrive).

    **Error boundaries.** A worker survives anything: a failing backend
    answers its batch ``internal``; any other unexpected exception is logged
    (rate-limited, :class:`~edge.ops.boundary.ErrorBoundary`, counted in
    ``medge_internal_errors_total{component="scheduler"}``), every frame of
    the batch not yet answered is answered ``internal``, and the worker
    takes the next batch. A result callback that raises is counted
    (``component="result_callback"`` and
    ``medge_replies_lost_total{reason="internal"}``) and the frame still
    counts as answered. :meth:`healthy` tells whether every worker runs.
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
        reg = metrics.registry if metrics is not None else None
        if metrics is not None:
            metrics.declare_models(self._queues)  # drops, stages, batch sizes at 0 from the start
        self._boundary = ErrorBoundary("scheduler", _log, reg)
        self._callback_boundary = ErrorBoundary("result_callback", _log, reg)
        self._accepting = False
        self._started = False
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
        want: frozenset[str] = frozenset(),
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
            Shed the stream's oldest frame on backlog or byte bound (True)
            or wait for room in the queue (False; never shed, run after live
            frames by the fair-sharing rule).
        track_e2e : bool
            Observe ``medge_end_to_end_seconds`` when the result is ready;
            sources that observe it after their own egress pass False.
        want : frozenset of str
            Extra outputs to compute for this image (``heatmap``,
            ``probability``; :data:`edge.types.EXTRA_OUTPUTS`); those the
            model cannot produce are ignored. Empty: the fast path.

        Raises
        ------
        ProtocolError
            ``unknown_model`` if the model is not served, ``overloaded`` if
            the queue is full in frames or bytes (live; non-live after
            waiting 30 s) or the scheduler is not accepting. Nothing is
            queued when it raises.
        """
        now = time.perf_counter_ns()
        name = model or self._default
        q = self._queues.get(name)
        if q is None:
            raise ProtocolError("unknown_model", f"Model {name!r} is not served (served: {', '.join(self._queues)}).")
        if not self._accepting:
            raise ProtocolError("overloaded", "The daemon is not accepting frames (starting or shutting down).")
        nbytes = int(image.nbytes)
        job = _Job(image, stream, source, callback, received_ns or now, now, live, track_e2e, nbytes=nbytes, want=want)
        pol = q.policy
        victims = self._enqueue(q, name, job)
        if victims is None:
            limit = f"{pol.queue_size} frames" + (f" or {pol.max_bytes // (1024 * 1024)} MiB" if pol.max_bytes else "")
            raise ProtocolError("overloaded", f"The queue of model {name!r} is full ({limit}).")
        for v in victims:
            self._answer_dropped(q, v)
        with self._lock:
            self._accepted += 1
        if self._metrics is not None:
            self._metrics.child(self._metrics.frames_received, source, name).inc()

    def _enqueue(self, q: _ModelQueue, name: str, job: _Job) -> list[_Job] | None:
        """Queue ``job`` under the queue's lock; the live frames shed for it, or ``None`` if there is no room."""
        stream, nbytes, live = job.stream, job.nbytes, job.live
        pol = q.policy
        victims: list[_Job] | None = []
        with q.lock:
            if live:
                victims = self._make_room(q, stream, nbytes)
            elif not q.room.wait_for(
                lambda: self._stopping or (len(q) < pol.queue_size and q.fits(nbytes)), timeout=_NONLIVE_WAIT_S
            ) or self._stopping:
                victims = None
            if victims is not None:
                for v in victims:
                    q.remove_live(v)
                    v.shed = True
                if live:
                    q.live.append(job)
                    q.per_stream[stream] = q.per_stream.get(stream, 0) + 1
                else:
                    q.nonlive.append(job)
                q.nbytes += nbytes
                if self._metrics is not None:  # set under the queue's lock: never a stale depth
                    self._metrics.child(self._metrics.queue_depth, name).set(len(q))
                q.cond.notify()
        return victims

    def infer(
        self,
        image: np.ndarray,
        *,
        model: str,
        source: str,
        timeout_s: float = 30.0,
        stream: str = "",
        want: frozenset[str] = frozenset(),
    ) -> InferenceResult:
        """Submit one image (non-live: never shed) and wait for its result (``want`` as for :meth:`submit`).

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

        self.submit(image, model=model, source=source, stream=stream or source, callback=_cb, live=False, want=want)
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
        self._started = True
        self._accepting = True
        return self

    def healthy(self) -> bool:
        """Whether the scheduler was started and every worker thread is alive (for ``/readyz``)."""
        return self._started and all(t.is_alive() for q in self._queues.values() for t in q.threads)

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
            with q.lock:
                q.cond.notify_all()
                q.room.notify_all()
        for q in self._queues.values():
            for t in q.threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        for q in self._queues.values():
            with q.lock:
                left = list(q.live) + list(q.nonlive)
                q.live.clear()
                q.nonlive.clear()
                q.per_stream.clear()
                q.nbytes = 0
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
    @staticmethod
    def _make_room(q: _ModelQueue, stream: str, nbytes: int) -> list[_Job] | None:
        """The live frames of ``stream`` to shed so a new live frame fits; ``None``: it does not (lock held).

        Sheds the stream's oldest waiting frame when the stream is at its
        backlog, and more of its oldest frames while the byte bound is
        exceeded; never another stream's frame. Nothing is shed when even
        that would not make room.
        """
        pol = q.policy
        at_backlog = q.per_stream.get(stream, 0) >= pol.stream_backlog
        if not at_backlog and q.fits(nbytes):
            return [] if len(q) < pol.queue_size else None
        victims: list[_Job] = []
        freed = 0

        def fits() -> bool:
            left = q.nbytes - freed
            return not pol.max_bytes or left + nbytes <= pol.max_bytes or left == 0

        for job in q.live:
            if len(victims) >= int(at_backlog) and fits():
                break
            if job.stream == stream:
                victims.append(job)
                freed += job.nbytes
        if not fits() or len(q) - len(victims) >= pol.queue_size:
            return None
        return victims

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
        except Exception as exc:  # error boundary: a broken callback must not kill the worker
            self._callback_boundary.report(exc, f"a result callback of source {job.source}")
            if self._metrics is not None:
                self._metrics.replies_lost.labels(reason="internal").inc()
        finally:
            with self._lock:
                self._answered += 1

    def _take(self, q: _ModelQueue) -> list[_Job] | None:
        """Block for the next micro-batch (live first, see the class notes); ``None`` when stopping and empty."""
        pol = q.policy
        with q.lock:
            while not q.live and not q.nonlive:
                if self._stopping:
                    return None
                q.cond.wait(0.5)
            nonlive = bool(q.nonlive) and (not q.live or q.live_streak >= NONLIVE_EVERY)
            if nonlive:
                q.live_streak = 0
                source = q.nonlive
            else:
                q.live_streak = q.live_streak + 1 if q.nonlive else 0
                source = q.live
                if pol.max_delay_us > 0 and len(q.live) < pol.max_batch and not self._stopping:
                    deadline = q.live[0].enqueued_ns + pol.max_delay_us * 1000
                    while len(q.live) < pol.max_batch and not self._stopping:
                        left = (deadline - time.perf_counter_ns()) / 1e9
                        if left <= 0:
                            break
                        q.cond.wait(left)
                    if not q.live:
                        return []
            n = min(pol.max_batch, len(source))
            batch = [q.pop(source) for _ in range(n)]
            depth = len(q)
            if self._metrics is not None:  # under the queue's lock, as in submit
                self._metrics.child(self._metrics.queue_depth, q.model.name).set(depth)
            q.room.notify_all()  # wake non-live submitters waiting for room
            if depth:
                q.cond.notify()  # another worker of this model may take the rest
        return batch

    def _internal_result(self, model: LoadedModel, message: str) -> InferenceResult:
        return InferenceResult(
            status="error",
            model=model.name,
            model_version=model.version,
            task=model.task,
            error_code="internal",
            error_message=message,
        )

    def _worker(self, q: _ModelQueue) -> None:
        """One worker thread: take a batch, run it, answer it; the worker's error boundary."""
        while True:
            try:
                batch = self._take(q)
            except Exception as exc:  # error boundary: count, log (rate-limited), keep serving
                self._boundary.report(exc, "taking a batch")
                time.sleep(0.01)  # a failing take must not spin a core
                continue
            if batch is None:
                return
            if batch:
                self._run_batch(q, batch)

    def _run_batch(self, q: _ModelQueue, batch: list[_Job]) -> None:
        """Run and answer one batch; whatever fails, every frame of it is answered exactly once."""
        model = q.model
        answered = 0
        try:
            t_start = time.perf_counter_ns()
            try:
                images = [j.image for j in batch]
                if any(j.want for j in batch):  # maps asked for (heatmap, probability); else the fast path
                    results = model.run(images, [j.want for j in batch])
                else:
                    results = model.run(images)
            except Exception as exc:  # the backend failed: answer every frame, keep serving
                self._boundary.report(exc, f"inference of a batch of {len(batch)}")
                results = [self._internal_result(model, f"Inference failed: {type(exc).__name__}.") for _ in batch]
            if len(results) != len(batch):
                raise RuntimeError(f"The model returned {len(results)} results for a batch of {len(batch)}.")
            now = time.perf_counter_ns()
            for job, res in zip(batch, results):
                res.timing_us["queue"] = max(0, (t_start - job.enqueued_ns) // 1000)
                res.timing_us["total"] = max(0, (now - job.received_ns) // 1000)
                if self._metrics is not None and res.status == "error" and res.error_code:
                    # failures are counted before the answer leaves: a client never sees one uncounted
                    self._metrics.requests_failed.labels(source=job.source, code=res.error_code).inc()
            # answer first, then the histograms: they are not on the frame's critical path
            for job, res in zip(batch, results):
                answered += 1
                self._deliver(job, res)
            if self._metrics is not None:
                self._observe(model.name, batch, results)
        except Exception as exc:  # error boundary of the worker: answer what is left, keep serving
            self._boundary.report(exc, "a worker")
            for job in batch[answered:]:
                if self._metrics is not None:
                    self._metrics.requests_failed.labels(source=job.source, code="internal").inc()
                self._deliver(job, self._internal_result(model, f"Internal error ({type(exc).__name__})."))

    def _observe(self, model: str, batch: list[_Job], results: list[InferenceResult]) -> None:
        m = self._metrics
        assert m is not None
        m.child(m.batch_size, model).observe(len(batch))
        for job, res in zip(batch, results):
            if res.status == "ok":
                m.observe_stages(model, res.timing_us)
            if job.track_e2e:
                m.child(m.end_to_end_seconds, job.source, model).observe(res.timing_us["total"] / 1e6)
