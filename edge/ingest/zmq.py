"""ZeroMQ ingest: the protocol v1 ROUTER socket, its I/O thread, and direct replies.

The ROUTER (requests) and PUB (results) sockets are guarded by one lock;
every ZeroMQ call on them is made holding it (a ZeroMQ socket may move
between threads behind a full memory barrier, which the lock provides).
The I/O thread waits for traffic on the ROUTER's notification descriptor
(``zmq.FD``) and a wake-up pipe *without* holding the lock, then takes it
to receive and validate what arrived. A valid request is handed to the
scheduler (:meth:`edge.scheduler.Scheduler.submit`, which never blocks for
live frames) and the thread goes back to waiting: it never waits on
inference.

The worker thread that produced a result encodes and sends the reply
itself, under the lock, and publishes it on PUB: no second hand-off to the
I/O thread, which on a small or virtual CPU costs a wake-up of an idle core
per frame. ``zmq.FD`` is edge-triggered: a send may consume the
notification of a message that arrived meanwhile, so after every send the
worker checks ``zmq.EVENTS`` and wakes the I/O thread through the pipe when
input is waiting (and the I/O thread's wait also ends every 50 ms, so even a
missed notification would delay a request by at most that).

Clients: DEALER (``[header, pixels]``, may pipeline) and REQ (whose empty
delimiter frame is kept in the reply envelope). A header with ``"op":
"models"`` (and no pixels frame) is answered at once by the I/O thread with
the served models and their input semantics (:func:`request_op`,
:func:`edge.egress.zmq.encode_models`); it is not published. Every malformed message is
answered with an ``error`` reply and counted in
``medge_requests_failed_total{source="zmq", code}``, never logged above
debug level; the daemon keeps serving. See ``docs/protocol.md`` for the
wire format.

Hostile input is refused before it can cost much: libzmq disconnects a
peer whose frame is over ``max(max_frame_bytes, MAX_HEADER_BYTES)``
(``ZMQ_MAXMSGSIZE``) before reading it; the header and the request are then
parsed and bounded by :mod:`edge.ingest.zmq_protocol` (no sockets there).

Error boundaries (:class:`edge.ops.boundary.ErrorBoundary`): per message, around
the I/O loop itself, and on the reply path the workers run; see
:class:`ZmqServer`. Replies that cannot be sent are counted in
``medge_replies_lost_total{reason}``.

Examples
--------
>>> srv = ZmqServer(config.zmq, scheduler, metrics).start()  # doctest: +SKIP
>>> srv.ingest_endpoint                                      # doctest: +SKIP
'tcp://127.0.0.1:5555'
>>> srv.stop_accepting(); scheduler.close(); srv.close()     # doctest: +SKIP
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import zmq

from edge.config import ZmqConfig
from edge.egress.zmq import (
    ERROR_CODES,
    Publisher,
    copy_is_cheaper,
    encode_error,
    encode_models,
    encode_result,
)
from edge.egress.zmq_catalogue import describe_models
from edge.errors import ConfigError, ProtocolError
from edge.ingest.zmq_protocol import (
    MAX_HEADER_BYTES,
    Request,
    check_sent_ns,
    check_version,
    decode_header,
    echo_sent_ns,
    parse_request,
    request_op,
)
from edge.ops.boundary import ErrorBoundary
from edge.ops.metrics import Metrics, REPLY_LOST_REASONS
from edge.types import InferenceResult, InferenceService, valid_stream

__all__ = ["ZmqServer", "SOURCE"]

_log = logging.getLogger(__name__)

SOURCE = "zmq"
_LOOP_FAILURES_MAX = 50  # consecutive I/O loop failures before it gives up (and healthy() is False)
_SOCKET_LINGER_MS = 500
_BATCH_RECV = 256  # messages drained per wake-up before workers get the socket lock
#: Frames kept of one message (identity, delimiter, header, pixels, and some to spare); the rest are let go
#: as they are read, so a message of millions of empty frames costs no memory here (answered payload_size).
_MAX_FRAMES = 8


def _input_waiting(sock: zmq.Socket) -> bool:
    """Whether ``sock`` has a message to receive (also processes its pending commands)."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


#: Replies with at least this many bytes of maps are sent zero-copy and tracked until libzmq lets go of them.
TRACKED_REPLY_BYTES = 1 << 20


class _HeldReplies:
    """The large replies libzmq still holds for each client (``reply_buffer_mib``), with their sizes.

    A message count (``SNDHWM``) cannot bound bytes without also refusing
    bursts of small replies to clients that do read (libzmq acknowledges
    reads lazily, half a high-water mark at a time). So large replies are
    sent zero-copy with a :class:`zmq.MessageTracker`, which says when
    libzmq has handed the last frame to the kernel, and counted per client
    until then. Used under the server's lock.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self._held: dict[bytes, list[tuple[Any, int]]] = {}

    def held(self, peer: bytes) -> int:
        """Bytes of ``peer``'s large replies not yet written to its connection (done ones forgotten)."""
        items = [(t, n) for t, n in self._held.get(peer, ()) if not t.done]
        if items:
            self._held[peer] = items
        else:
            self._held.pop(peer, None)
        return sum(n for _, n in items)

    def admits(self, peer: bytes, nbytes: int) -> bool:
        """Whether a reply of ``nbytes`` may be queued for ``peer`` (always, when nothing is held for it)."""
        if len(self._held) > 256:  # clients that went away leave done trackers behind: sweep them
            for other in list(self._held):
                self.held(other)
        held = self.held(peer)
        return held == 0 or held + nbytes <= self.budget

    def add(self, peer: bytes, tracker: Any, nbytes: int) -> None:
        self._held.setdefault(peer, []).append((tracker, nbytes))


@dataclass(eq=False)
class _Pending:
    envelope: list[bytes]
    request: Request
    received_ns: int = 0


class ZmqServer:
    """The protocol v1 ROUTER + PUB server with its I/O thread.

    Parameters
    ----------
    config : ZmqConfig
        Endpoints, limits, high-water marks, default stream.
    service : InferenceService
        The scheduler (``submit`` must not block for live frames).
    metrics : Metrics, optional
    context : zmq.Context, optional
        Shared context (default: a private one, terminated on close, with a
        bounded wait).
    catalog : iterable of LoadedModel (or Manifest), optional
        The served models, described in the reply to ``{"v": 1, "op":
        "models"}`` (:func:`edge.egress.zmq_catalogue.describe_model`). Without it
        that reply lists each served model by ``name`` only.

    Raises
    ------
    ConfigError
        From :meth:`start`, when an endpoint cannot be bound (naming the key).

    Notes
    -----
    Bounds, all set before anything is allocated: the ROUTER's
    ``ZMQ_MAXMSGSIZE`` is ``max(max_frame_bytes, MAX_HEADER_BYTES)``, so
    libzmq disconnects a peer whose frame announces more, before it reads the
    frame; its send and receive high-water marks are ``hwm`` messages, and
    large replies (:data:`TRACKED_REPLY_BYTES` of maps or more) are also
    bounded in bytes per client, ``reply_buffer_mib`` (:class:`_HeldReplies`),
    so a client that stops reading costs that, not ``hwm`` x a 4096x4096
    reply's two maps. The
    PUB socket's high-water mark is ``publish_hwm`` messages per subscriber
    (see :class:`~edge.egress.zmq.Publisher`). ``ZMQ_ROUTER_MANDATORY`` is on,
    so a reply that cannot be queued (the client is not reading, or has
    gone) is seen and counted in ``medge_replies_lost_total`` rather than
    silently discarded.

    Error boundaries: one per message (an unexpected exception answers that
    message ``internal``), one around the I/O loop itself (it logs, counts
    ``medge_internal_errors_total{component="zmq_io"}`` and keeps serving; only
    after many failures in a row does it stop, and then :meth:`healthy` is
    False) and one on the reply path, run by the scheduler's workers
    (``component="zmq_reply"``). The count of replies in flight is always
    decremented, whatever happens to the reply.
    """

    def __init__(
        self,
        config: ZmqConfig,
        service: InferenceService,
        metrics: Metrics | None = None,
        context: zmq.Context | None = None,
        catalog: Iterable[Any] | None = None,
    ) -> None:
        self._cfg = config
        self._service = service
        self._metrics = metrics
        # described once: the models served do not change while the daemon runs
        self._catalog = (
            describe_models(catalog) if catalog is not None else [{"name": n} for n in service.models()]
        )
        default = getattr(service, "default_model", None)
        self._default_model = default if isinstance(default, str) and default else None
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        self._lock = threading.RLock()  # guards both sockets and the counters below
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        registry = metrics.registry if metrics is not None else None
        self._io_boundary = ErrorBoundary("zmq_io", _log, registry)
        self._reply_boundary = ErrorBoundary("zmq_reply", _log, registry)
        self._held = _HeldReplies(config.reply_buffer_mib << 20)
        self._lost: dict[str, Any] = {}
        if metrics is not None:
            self._lost = {r: metrics.replies_lost.labels(reason=r) for r in REPLY_LOST_REASONS}
            metrics.declare_source(SOURCE, service.models(), ERROR_CODES)  # every series at 0 from the start
        self._accepting = True
        self._closing = threading.Event()
        self._failed = False
        self._thread: threading.Thread | None = None
        self._router: zmq.Socket | None = None
        self._router_fd = -1
        self._pub: Publisher | None = None
        self._sockets_open = False
        self._sockets_closed = False
        self._inflight = 0
        self._close_timeout_s = 2.0
        self.ingest_endpoint = ""
        self.publish_endpoint = ""
        self.accepted = 0
        self.replied = 0
        self.last_turn = time.monotonic()  # the I/O loop's heartbeat (healthy(stall_s))

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "ZmqServer":
        """Bind both sockets and start the I/O thread."""
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.RCVHWM, self._cfg.hwm)
        router.setsockopt(zmq.SNDHWM, self._cfg.hwm)
        router.setsockopt(zmq.MAXMSGSIZE, max(self._cfg.max_frame_bytes, MAX_HEADER_BYTES))
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.LINGER, _SOCKET_LINGER_MS)
        try:
            router.bind(self._cfg.ingest)
        except zmq.ZMQError as exc:
            router.close(linger=0)
            raise ConfigError(f"Config key zmq.ingest: cannot bind {self._cfg.ingest}: {exc}.") from exc
        try:
            m = self._metrics
            self._pub = Publisher(
                self._ctx,
                self._cfg.publish,
                hwm=self._cfg.publish_hwm,
                terminated=getattr(self._cfg, "publish_topic", "exact") != "bare",
                published=m.published if m is not None else None,
                dropped=m.publish_dropped if m is not None else None,
            )
        except zmq.ZMQError as exc:
            router.close(linger=0)
            raise ConfigError(f"Config key zmq.publish: cannot bind {self._cfg.publish}: {exc}.") from exc
        self._router = router
        self._router_fd = int(router.getsockopt(zmq.FD))
        self._sockets_open = True
        self.ingest_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.publish_endpoint = self._pub.endpoint
        self._thread = threading.Thread(target=self._loop, name="medge-zmq-io", daemon=True)
        self._thread.start()
        _log.info("ZeroMQ ingest (ROUTER) on %s, results (PUB) on %s.", self.ingest_endpoint, self.publish_endpoint)
        return self

    def healthy(self, stall_s: float | None = None) -> bool:
        """Whether the I/O thread is running, has not given up and (with ``stall_s``) turned recently.

        The loop turns at least every 50 ms even when idle, so one that has
        not turned for ``stall_s`` is stuck (e.g. inside a send or its lock).
        """
        t = self._thread
        if t is None or not t.is_alive() or self._failed:
            return False
        return stall_s is None or time.monotonic() - self.last_turn < stall_s

    def stop_accepting(self) -> None:
        """Answer new requests ``overloaded`` (shutting down); in-flight ones still get replies."""
        self._accepting = False

    def publish(self, stream: str, header: bytes, payload: Iterable[Any] = ()) -> None:
        """Publish a result of another source (``[[capture]]``) on PUB, under the socket lock.

        Used only while the sockets are open; otherwise the result is counted
        in ``medge_publish_dropped_total{reason="closed"}``.
        """
        with self._lock:
            if not self._sockets_open or self._pub is None:
                if self._metrics is not None:
                    self._metrics.publish_dropped.labels(reason="closed").inc()
                return
            self._pub.publish(stream, header, list(payload))

    def close(self, timeout_s: float = 2.0) -> None:
        """Send the replies still owed (up to ``timeout_s``), close the sockets, stop the thread.

        Returns within about ``timeout_s`` + 1.5 s whatever state the I/O
        thread is in: the sockets close with a linger and the private context
        is terminated with a bounded wait.
        """
        self._accepting = False
        self._close_timeout_s = timeout_s
        self._closing.set()
        self._wake()
        stuck = False
        if self._thread is not None:
            self._thread.join(timeout=timeout_s + 0.5)
            stuck = self._thread.is_alive()
        locked = self._lock.acquire(timeout=1.0)  # a stuck I/O thread may hold it; close anyway
        try:
            self._sockets_open = False
            if not self._sockets_closed:
                if stuck:
                    _log.error("The ZeroMQ I/O thread did not stop; closing its sockets forcibly.")
                self._close_sockets(0 if stuck else _SOCKET_LINGER_MS)
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._wake_r = self._wake_w = -1  # closed once: the numbers may be reused
        finally:
            if locked:
                self._lock.release()
        if self._own_ctx:
            _term_context(self._ctx, timeout_s=_SOCKET_LINGER_MS / 1000 + 0.5)
        _log.info("ZeroMQ server closed: %d frames accepted, %d replies sent.", self.accepted, self.replied)

    def __enter__(self) -> "ZmqServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_sockets(self, linger_ms: int) -> None:
        """Close both sockets once (caller holds the lock or owns them)."""
        self._sockets_open = False
        if self._sockets_closed:
            return
        self._sockets_closed = True
        if self._router is not None:
            self._router.close(linger=linger_ms)
        if self._pub is not None:
            self._pub.close(linger_ms=min(linger_ms, 200))

    # ----------------------------------------------------------------- worker side
    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already; the I/O thread will look at the socket
        except OSError:
            pass  # closed during shutdown

    def _count_lost(self, reason: str) -> None:
        counter = self._lost.get(reason)
        if counter is not None:
            counter.inc()

    def _send_reply(self, frames: list[Any], copy: bool = True, nbytes: int = 0) -> bool:
        """Send one reply on the ROUTER (lock held); count it lost when it cannot be queued.

        ``nbytes``: the bytes of its maps; from :data:`TRACKED_REPLY_BYTES` on,
        sent zero-copy and held against the client's ``reply_buffer_mib``.
        """
        router = self._router
        assert router is not None
        tracked = nbytes >= TRACKED_REPLY_BYTES
        try:
            if tracked and not self._held.admits(frames[0], nbytes):
                raise zmq.Again()
            tracker = router.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy and not tracked, track=tracked)
            if tracked:
                self._held.add(frames[0], tracker, nbytes)
        except zmq.Again:
            self._count_lost("hwm")
            _log.debug("A reply was not sent: the client's high-water mark is reached (it is not reading).")
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self._count_lost("disconnected")
            _log.debug("A reply was not sent: the client has disconnected.")
            return False
        return True

    def _on_result(self, pending: _Pending, result: InferenceResult) -> None:
        """Called from the thread that produced the result (a worker): encode, send, publish.

        Never raises: the reply path's error boundary. The in-flight count is
        decremented exactly once, whatever happens.
        """
        ready = time.perf_counter_ns()
        req = pending.request
        decremented = sent = False
        observe_ok = False
        try:
            reply = encode_result(
                req.id,
                result,
                stream=req.stream,
                want_mask=req.want_mask,
                want_boxes=req.want_boxes,
                sent_ns=req.sent_ns,
            )
            if reply.substituted:  # the intended reply is lost; an internal error goes instead
                self._count_lost("encode")
                if self._metrics is not None and result.status == "ok":
                    self._metrics.requests_failed.labels(source=SOURCE, code="internal").inc()
            observe_ok = result.status == "ok" and not reply.substituted
            payload = reply.payload  # the map frames: mask, probability, heatmap (as described)
            frames: list[Any] = [*pending.envelope, reply.header, *payload]
            copy = copy_is_cheaper(payload)
            with self._lock:
                self._inflight -= 1
                decremented = True
                if not self._sockets_open:
                    self._count_lost("closed")
                    _log.debug("A reply was ready after the ZeroMQ sockets closed; it is lost.")
                    return
                router = self._router
                assert router is not None and self._pub is not None
                sent = self._send_reply(frames, copy=copy, nbytes=sum(int(p.nbytes) for p in payload))
                if sent:
                    self.replied += 1
                self._pub.publish(req.stream, reply.header, payload)
                # the send may have consumed the edge-triggered notification of new input
                if _input_waiting(router) or (self._closing.is_set() and self._inflight <= 0):
                    self._wake()
        except Exception as exc:  # error boundary of the reply path: count, log (rate-limited), go on
            self._reply_boundary.report(exc, "sending a ZeroMQ reply")
            if not sent:
                self._count_lost("internal")
            observe_ok = False
        finally:
            if not decremented:
                with self._lock:
                    self._inflight -= 1
                    if self._sockets_open and self._closing.is_set() and self._inflight <= 0:
                        self._wake()  # only while open: a closed pipe's fd number may be reused
        if observe_ok and self._metrics is not None:
            done = time.perf_counter_ns()
            self._metrics.child(self._metrics.stage_seconds, result.model, "egress").observe((done - ready) / 1e9)
            self._metrics.child(self._metrics.end_to_end_seconds, SOURCE, result.model).observe(
                (done - pending.received_ns) / 1e9
            )

    # ----------------------------------------------------------------- I/O thread
    def _loop(self) -> None:
        """The I/O thread: receive, validate, submit; its own error boundary around each pass."""
        failures = 0
        try:
            router = self._router
            assert router is not None and self._pub is not None
            waiter = select.poll()
            waiter.register(self._router_fd, select.POLLIN)
            waiter.register(self._wake_r, select.POLLIN)
            deadline: float | None = None
            while True:
                self.last_turn = time.monotonic()
                try:
                    if self._closing.is_set():
                        if deadline is None:
                            deadline = time.monotonic() + self._close_timeout_s
                        if self._inflight <= 0:
                            break
                        if time.monotonic() > deadline:
                            _log.warning("Closing with %d replies unsent.", self._inflight)
                            break
                    with self._lock:
                        more = self._drain(router)
                    failures = 0
                    if more:
                        continue  # a burst: keep draining, _BATCH_RECV messages per hold of the lock
                    for fd, _ in waiter.poll(50):
                        if fd == self._wake_r:
                            try:
                                os.read(self._wake_r, 65536)
                            except BlockingIOError:
                                pass
                except Exception as exc:  # error boundary of the loop: log (rate-limited), count, keep serving
                    failures += 1
                    self._io_boundary.report(exc, "the ZeroMQ I/O loop")
                    if failures >= _LOOP_FAILURES_MAX or isinstance(exc, zmq.ContextTerminated):
                        self._failed = True
                        _log.error(
                            "The ZeroMQ I/O loop failed %d times in a row; it stops (readiness reports it).", failures
                        )
                        return
                    self._closing.wait(min(0.1, 0.001 * 2**failures))  # back off a failing loop
        finally:
            with self._lock:
                self._close_sockets(_SOCKET_LINGER_MS)

    def _drain(self, router: zmq.Socket) -> bool:
        """Receive and handle up to ``_BATCH_RECV`` messages (lock held); whether more are waiting.

        The socket's ``ZMQ_EVENTS`` says when a message is there, so the
        loop never ends on a ``zmq.Again`` (raising it costs more than the
        receive). Frames are read one by one with their ``more`` flag.
        """
        for _ in range(_BATCH_RECV):
            if not _input_waiting(router):
                return False
            try:
                frame = router.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # not expected after ZMQ_EVENTS said POLLIN
                return False
            frames = [frame]
            total = 1
            while frame.more:  # the rest of a multipart message is already there (atomic delivery)
                frame = router.recv(zmq.NOBLOCK, copy=False)
                total += 1
                if total <= _MAX_FRAMES:  # the rest is read and let go: a message's frame count is unbounded
                    frames.append(frame)
            if total > _MAX_FRAMES:
                self._refuse_frame_count(frames, total)
            else:
                self._handle(frames)
        return _input_waiting(router)

    def _refuse_frame_count(self, frames: list[zmq.Frame], total: int) -> None:
        """Answer a message of more than ``_MAX_FRAMES`` frames (the identity included) ``payload_size``, unread."""
        envelope = [frames[0].bytes]
        if len(frames) > 1 and len(frames[1]) == 0:  # a REQ client's delimiter
            envelope.append(b"")
        self._reply_error(
            envelope, None, "payload_size",
            f"The message has {total - 1} frames; a request has at most 3 (an optional empty delimiter, the header, "
            "the pixels).", None, None, None,
        )

    def _reply_error(
        self,
        envelope: list[bytes],
        request_id: Any,
        code: str,
        message: str,
        stream: str | None,
        model: str | None,
        sent_ns: Any,
    ) -> None:
        """Answer one request with an error; publish it when its stream is known (``stream`` not None)."""
        assert self._pub is not None
        header = encode_error(request_id, code, message, stream=stream, model=model, sent_ns=echo_sent_ns(sent_ns))
        if self._metrics is not None:  # counted before the reply leaves, so a client never sees it uncounted
            self._metrics.requests_failed.labels(source=SOURCE, code=code).inc()
        self._send_reply([*envelope, header])
        if stream is not None:  # an unknown or invalid stream has no topic: never published as "default"
            self._pub.publish(stream, header)

    def _reply_models(self, envelope: list[bytes], request_id: Any, sent_ns: Any) -> None:
        """Answer ``op: models`` (not published: it is no stream's result)."""
        header = encode_models(
            request_id, self._catalog, default_model=self._default_model, sent_ns=echo_sent_ns(sent_ns)
        )
        self._send_reply([*envelope, header])

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """One ROUTER message: validate, submit, or answer with an error. The per-message error boundary."""
        received = time.perf_counter_ns()
        envelope = [frames[0].bytes]
        body = frames[1:]
        if body and len(body[0]) == 0:  # REQ clients (and DEALERs that imitate them) send a delimiter
            envelope.append(b"")
            body = body[1:]
        rid: Any = None
        stream: str | None = None  # unknown until the header is read; an invalid one stays unknown
        model: str | None = None
        sent_ns: Any = None
        try:
            if not body:
                raise ProtocolError("bad_header", "The message has no header frame.")
            header = decode_header(body[0].bytes)
            # a decoded header holds only encodable values: safe to echo in the error reply
            rid = header.get("id")
            sent_ns = header.get("sent_ns")
            requested_stream = header.get("stream", self._cfg.default_stream)
            if valid_stream(requested_stream) and header.get("op") != "models":
                stream = requested_stream  # a models request's replies, errors too, are no stream's: not published
            if isinstance(header.get("model"), str):
                model = header["model"][:64]
            check_version(header)
            if request_op(header) == "models":
                if len(body) > 1:
                    raise ProtocolError(
                        "payload_size", f"The message has {len(body)} frames; op \"models\" takes the header only."
                    )
                check_sent_ns(sent_ns)  # checked as for a frame request: bad_header, never silently dropped
                self._reply_models(envelope, rid, sent_ns)
                return
            req = parse_request(
                header,
                body,
                models=self._service.models(),
                default_stream=self._cfg.default_stream,
                max_pixels=self._cfg.max_pixels,
                max_frame_bytes=self._cfg.max_frame_bytes,
            )
            if not self._accepting:
                raise ProtocolError("overloaded", "The daemon is shutting down; the frame was not accepted.")
            pending = _Pending(envelope, req, received_ns=received)
            self._inflight += 1  # before submit: a shed or fast result may come back at once
            try:
                self._service.submit(
                    req.image,
                    model=req.model,
                    source=SOURCE,
                    stream=req.stream,
                    callback=functools.partial(self._on_result, pending),
                    received_ns=received,
                    track_e2e=False,
                    want=req.extras,
                )
            except BaseException:
                self._inflight -= 1  # not accepted: no callback will come
                raise
            self.accepted += 1
        except ProtocolError as exc:  # bad input is the peer's problem: answered and counted, never a traceback
            _log.debug("A ZeroMQ request was refused: %s.", exc.code)
            self._reply_error(envelope, rid, exc.code, exc.message, stream, model, sent_ns)
        except Exception as exc:  # error boundary of the receiver: log (rate-limited), count, answer, keep serving
            self._io_boundary.report(exc, "handling a ZeroMQ request")
            self._reply_error(envelope, rid, "internal", f"Internal error ({type(exc).__name__}).", stream, model, sent_ns)


def _term_context(ctx: zmq.Context, timeout_s: float) -> None:
    """Terminate ``ctx``, waiting at most ``timeout_s`` (a socket left open would block ``term`` forever)."""
    t = threading.Thread(target=ctx.term, name="medge-zmq-term", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        _log.warning("The ZeroMQ context did not terminate within %.1f s; leaving it to process exit.", timeout_s)
