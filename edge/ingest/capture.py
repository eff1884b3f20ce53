"""Capture ingest: a ``[[capture]]`` video source read as a live stream, inside the daemon.

Frames come from :class:`edge.ingest.capture_frames.FrameStream` (a V4L2
device, a video file or a stream URL through PyAV: opened, reopened with
backoff, paced, cropped, converted) on one thread per source,
``medge-capture-<name>``. Each is handed to the scheduler as a live frame
(:meth:`edge.scheduler.Scheduler.submit`, ``source="capture"``, the
configured stream), so the overload policy is the ZeroMQ frames': the
stream's oldest waiting frame is shed when a newer one would exceed
``[scheduler] stream_backlog`` (newest wins); a frame that finds the queue
full is counted as ``medge_requests_failed_total{source="capture",
code="overloaded"}`` and not retried.

Results leave exactly as ZeroMQ frames' do: the worker that produced one
encodes it with :func:`edge.egress.zmq.encode_result` (``id`` the frame's
number since start, ``sent_ns`` the wall-clock time it was submitted, mask
and boxes included) and publishes it on the daemon's PUB socket under the
stream's topic, so a viewer subscribes to a capture stream as to any other.
``medge_stage_seconds{stage="egress"}`` and
``medge_end_to_end_seconds{source="capture"}`` (submitted until published)
are observed as for ZeroMQ. With ``[zmq] enabled = false`` nothing is
published and results are only counted.

A source that is absent or fails never stops the daemon: it is retried
(see :mod:`edge.ingest.capture_frames`), ``medge_capture_up{capture}`` says
0 and :meth:`CaptureSource.status` says why. Only the thread itself dying
(which its error boundary prevents) makes :meth:`CaptureSource.healthy`
false.

Examples
--------
>>> src = CaptureSource(config.capture[0], scheduler, metrics, publish).start()  # doctest: +SKIP
>>> src.status()                                                                 # doctest: +SKIP
'up; 912 frames decoded, 912 submitted, 0 skipped'
>>> src.close()                                                                  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from edge.config import CaptureConfig
from edge.egress.zmq import encode_result
from edge.errors import ProtocolError
from edge.ingest.capture_frames import Captured, FrameStream
from edge.ops.boundary import ErrorBoundary, LogThrottle
from edge.ops.metrics import MODEL_FAILURE_CODES, Metrics, metrics_for
from edge.types import InferenceResult, InferenceService

__all__ = ["CaptureSource", "Publish", "SOURCE", "FAILURE_CODES"]

_log = logging.getLogger(__name__)

SOURCE = "capture"
#: the codes ``medge_requests_failed_total{source="capture"}`` can count: the model's, and a full queue
FAILURE_CODES = (*MODEL_FAILURE_CODES, "overloaded")
_RESTART_S = 1.0  # after an unexpected error in the loop itself

#: ``publish(stream, header, payload)``: hands one encoded result to the PUB socket (thread-safe).
Publish = Callable[[str, bytes, Sequence[np.ndarray]], None]


class CaptureSource:
    """One ``[[capture]]`` source on its own thread: frames to the scheduler, results to PUB.

    Parameters
    ----------
    config : CaptureConfig
        Validated (``model`` and ``stream`` filled in).
    service : InferenceService
        The scheduler.
    metrics : Metrics, optional
    publish : callable, optional
        :data:`Publish` for the daemon's PUB socket; ``None``: results are not published.
    reader : FrameStream, optional
        The frame source (default: one made from ``config``; tests pass their own).

    Notes
    -----
    Error boundaries: the thread's loop (``medge_internal_errors_total{component="capture"}``;
    the stream is started again after a second) and the publishing of a
    result, run by a model worker (``component="capture_publish"``).
    """

    def __init__(
        self,
        config: CaptureConfig,
        service: InferenceService,
        metrics: Metrics | None = None,
        publish: Publish | None = None,
        *,
        reader: FrameStream | None = None,
    ) -> None:
        self.config = config
        self._service = service
        self._metrics = metrics
        self._publish = publish
        registry = metrics.registry if metrics is not None else None
        group = metrics_for(registry).capture if registry is not None else None
        self.reader = reader if reader is not None else FrameStream(config, group)
        self._boundary = ErrorBoundary("capture", _log, registry)
        self._publish_boundary = ErrorBoundary("capture_publish", _log, registry)
        self._throttle = LogThrottle(_log, interval_s=30.0)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.submitted = 0
        self.refused = 0
        if group is not None:
            group.up.labels(capture=config.name).set_function(lambda: 1.0 if self.up else 0.0)
        if metrics is not None:
            metrics.declare_source(SOURCE, [config.model], FAILURE_CODES)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "CaptureSource":
        """Start the thread (it opens the source; an absent one is retried there)."""
        self._thread = threading.Thread(target=self._run, name=f"medge-capture-{self.config.name}", daemon=True)
        self._thread.start()
        _log.info(
            "Capture %s: %s (%s) -> model %s, stream %r.",
            self.config.name, self.reader.described, self.reader.kind, self.config.model, self.config.stream_name,
        )
        return self

    def stop(self) -> None:
        """Stop reading and submitting, without waiting (see :meth:`close`)."""
        self._closing.set()
        self.reader.stop()

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop reading and submitting; wait up to ``timeout_s`` for the thread.

        A thread blocked in a device read or an open (a driver that
        delivers nothing, a FIFO with no writer) is left to end with the
        process (:attr:`blocked`); it submits nothing more.
        """
        self.stop()
        if self._thread is not None:
            self._thread.join(max(0.0, timeout_s))
            if self._thread.is_alive():
                _log.warning("Capture %s: the reading thread is still blocked in the source; not waiting.",
                             self.config.name)

    @property
    def blocked(self) -> bool:
        """Stopped, and its thread has not ended (blocked inside FFmpeg or a system call)."""
        t = self._thread
        return self._closing.is_set() and t is not None and t.is_alive()

    @property
    def up(self) -> bool:
        """The source is open and delivering frames."""
        return self.reader.up

    def healthy(self) -> bool:
        """False only if the thread died while it should run (not for an absent source or a finished file)."""
        t = self._thread
        if t is None or t.is_alive() or self._closing.is_set():
            return True
        return self.reader.ended

    def status(self) -> str:
        """One line for ``/healthz``: up or down (and why), frames so far; never frame data."""
        f = self.reader
        if f.up:
            state = f.status
        elif f.opened:
            state = f"down: no usable frame for 5 s ({f.status})" if f.status != "up" else "down: no frame for 5 s"
        else:
            state = f.status
        skipped = sum(f.skipped.values())
        return f"{state}; {f.decoded} frames decoded, {self.submitted} submitted, {skipped} skipped"

    # ----------------------------------------------------------------- the thread
    def _run(self) -> None:
        """Iterate the frame stream until closed or a file ends; the loop's error boundary."""
        while not self._closing.is_set():
            try:
                for item in self.reader:
                    if self._closing.is_set():
                        return
                    self._submit(item)
                if self.reader.ended or self.reader.stopped:
                    return
            except Exception as exc:  # error boundary of the capture loop: count, log (rate-limited), restart
                self._boundary.report(exc, f"capture {self.config.name}")
                self._closing.wait(_RESTART_S)

    def _submit(self, item: Captured) -> None:
        """Wait until the frame is due, then hand it to the scheduler (never blocks on inference)."""
        delay = min(item.due - time.monotonic(), self.reader.pacer.ahead_max_s, threading.TIMEOUT_MAX)
        if delay > 0 and self._closing.wait(delay):
            return
        with self._lock:
            n = self.submitted
            self.submitted += 1
        received = time.perf_counter_ns()
        sent_ns = time.time_ns()
        try:
            self._service.submit(
                item.image,
                model=self.config.model or None,
                source=SOURCE,
                stream=self.config.stream_name,
                callback=functools.partial(self._on_result, n, sent_ns, received),
                received_ns=received,
                track_e2e=self._publish is None,
            )
        except ProtocolError as exc:  # overloaded (queue full, or shutting down): counted, the frame is gone
            self.refused += 1
            if self._metrics is not None:
                self._metrics.requests_failed.labels(source=SOURCE, code=exc.code).inc()
            self._throttle.warning(exc.code, "Capture %s: a frame was refused (%s).", self.config.name, exc.code)

    def _on_result(self, n: int, sent_ns: int, received_ns: int, result: InferenceResult) -> None:
        """Called by the worker that produced the result: encode and publish (the publishing error boundary)."""
        if self._publish is None:
            return
        ready = time.perf_counter_ns()
        try:
            reply = encode_result(n, result, stream=self.config.stream_name, sent_ns=sent_ns)
            if reply.substituted and result.status == "ok" and self._metrics is not None:
                self._metrics.requests_failed.labels(source=SOURCE, code="internal").inc()
            self._publish(self.config.stream_name, reply.header, reply.payload)
        except Exception as exc:  # error boundary: a result that cannot be published must not kill the worker
            self._publish_boundary.report(exc, f"publishing a result of capture {self.config.name}")
            return
        m = self._metrics
        if m is not None and result.status == "ok" and not reply.substituted:
            done = time.perf_counter_ns()
            m.child(m.stage_seconds, result.model, "egress").observe((done - ready) / 1e9)
            m.child(m.end_to_end_seconds, SOURCE, result.model).observe((done - received_ns) / 1e9)
