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
delimiter frame is kept in the reply envelope). Every malformed message is
answered with an ``error`` reply and counted in
``medge_requests_failed_total{source="zmq", code}``; the daemon keeps
serving. See ``docs/protocol.md`` for the wire format.

Examples
--------
>>> srv = ZmqServer(config.zmq, scheduler, metrics).start()  # doctest: +SKIP
>>> srv.ingest_endpoint                                      # doctest: +SKIP
'tcp://127.0.0.1:5555'
>>> srv.stop_accepting(); scheduler.close(); srv.close()     # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import select
import threading
import time
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zmq

from edge.config import ZmqConfig
from edge.egress.zmq import PROTOCOL_VERSION, Publisher, encode_error, encode_result
from edge.errors import ConfigError, ProtocolError
from edge.metrics import Metrics
from edge.preprocess import SUPPORTED_DTYPES
from edge.types import InferenceResult, InferenceService

__all__ = ["Request", "parse_header", "parse_request", "ZmqServer", "SOURCE", "MAX_HEADER_BYTES"]

_log = logging.getLogger(__name__)

SOURCE = "zmq"
MAX_HEADER_BYTES = 65536
_MAX_STREAM_CHARS = 128
_ZERO_COPY_BYTES = 128 * 1024
_BATCH_RECV = 256  # messages drained per wake-up before workers get the socket lock
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}


def _input_waiting(sock: zmq.Socket) -> bool:
    """Whether ``sock`` has a message to receive (also processes its pending commands)."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


@dataclass(frozen=True)
class Request:
    """One validated frame request."""

    id: Any
    model: str | None
    stream: str
    image: np.ndarray
    want_mask: bool
    want_boxes: bool
    sent_ns: int | None


def parse_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode and check the JSON header frame.

    Raises
    ------
    ProtocolError
        ``bad_header``: not UTF-8 JSON, not an object, or ``v`` is not 1.
    """
    hdr = _decode_header(frame)
    _check_version(hdr)
    return hdr


def _decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    raw = frame if isinstance(frame, bytes) else bytes(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("bad_header", f"The header frame is larger than {MAX_HEADER_BYTES} bytes.")
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("bad_header", f"The header frame is not UTF-8 JSON ({exc.__class__.__name__}).") from exc
    if not isinstance(hdr, dict):
        raise ProtocolError("bad_header", "The header is not a JSON object.")
    return hdr


def _check_version(hdr: dict[str, Any]) -> None:
    v = hdr.get("v")
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise ProtocolError("bad_header", f"Header field v is {str(v)[:16]!r}; this daemon speaks protocol v1 (\"v\": 1).")


def _dims(shape: Any, max_pixels: int) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) not in (2, 3):
        raise ProtocolError("bad_shape", f"shape {shape!r} is not [H, W] or [H, W, C].")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError("bad_shape", f"shape {shape!r} has a non-integer dimension.")
    if min(shape) < 1:
        raise ProtocolError("bad_shape", f"shape {shape!r} has a dimension below 1.")
    if len(shape) == 3 and shape[2] not in (1, 3):
        raise ProtocolError("bad_shape", f"shape {shape!r}: C must be 1 or 3, not {shape[2]}.")
    if shape[0] * shape[1] > max_pixels:
        raise ProtocolError(
            "bad_shape", f"shape {shape!r} has {shape[0] * shape[1]} pixels; the limit is {max_pixels}."
        )
    return tuple(shape)


def parse_request(
    header: dict[str, Any],
    frames: Sequence[Any],
    *,
    models: Sequence[str],
    default_stream: str = "default",
    max_pixels: int = 4096 * 4096,
    max_frame_bytes: int = 64 * 1024 * 1024,
) -> Request:
    """Validate a request whose header is already parsed; ``frames`` are ``[header, pixels]``.

    ``frames`` items are ``bytes`` or ``zmq.Frame`` (whose buffer becomes the
    image without a copy).

    Raises
    ------
    ProtocolError
        With code ``bad_header``, ``unknown_model``, ``bad_dtype``,
        ``bad_shape`` or ``payload_size``.
    """
    model = header.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError("bad_header", "Header field model is not a string.")
    if model is not None and model not in models:
        raise ProtocolError("unknown_model", f"Model {model[:64]!r} is not served (served: {', '.join(models)}).")
    stream = header.get("stream", default_stream)
    if not isinstance(stream, str) or not stream or len(stream) > _MAX_STREAM_CHARS:
        raise ProtocolError("bad_header", f"Header field stream must be a non-empty string of at most {_MAX_STREAM_CHARS} characters.")
    want = header.get("want", ["mask", "boxes"])
    if not isinstance(want, list) or not all(isinstance(w, str) for w in want):
        raise ProtocolError("bad_header", "Header field want is not a list of strings.")
    sent_ns = header.get("sent_ns")
    if sent_ns is not None and (not isinstance(sent_ns, int) or isinstance(sent_ns, bool)):
        raise ProtocolError("bad_header", "Header field sent_ns is not an integer.")
    if "dtype" not in header:
        raise ProtocolError("bad_header", "Header field dtype is missing.")
    dtype = header["dtype"]
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        raise ProtocolError("bad_dtype", f"dtype {str(dtype)[:32]!r} is not one of {', '.join(SUPPORTED_DTYPES)}.")
    if "shape" not in header:
        raise ProtocolError("bad_header", "Header field shape is missing.")
    shape = _dims(header["shape"], max_pixels)
    if len(frames) < 2:
        raise ProtocolError("payload_size", "The message has no pixels frame (expected [header, pixels]).")
    if len(frames) > 2:
        raise ProtocolError("payload_size", f"The message has {len(frames)} frames (expected [header, pixels]).")
    pixels = frames[1]
    buf = pixels.buffer if isinstance(pixels, zmq.Frame) else memoryview(pixels)
    dt = _WIRE_DTYPES[dtype]
    expected = math.prod(shape) * dt.itemsize
    if buf.nbytes > max_frame_bytes:
        raise ProtocolError("payload_size", f"The pixels frame has {buf.nbytes} bytes; the limit is {max_frame_bytes}.")
    if buf.nbytes != expected:
        raise ProtocolError(
            "payload_size",
            f"The pixels frame has {buf.nbytes} bytes; shape {list(shape)} of {dtype} needs {expected}.",
        )
    image = np.frombuffer(buf, dtype=dt).reshape(shape)
    return Request(
        id=header.get("id"),
        model=model,
        stream=stream,
        image=image,
        want_mask="mask" in want,
        want_boxes="boxes" in want,
        sent_ns=sent_ns,
    )


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
        Shared context (default: a private one, terminated on close).

    Raises
    ------
    ConfigError
        From :meth:`start`, when an endpoint cannot be bound (naming the key).
    """

    def __init__(
        self,
        config: ZmqConfig,
        service: InferenceService,
        metrics: Metrics | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self._cfg = config
        self._service = service
        self._metrics = metrics
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        self._lock = threading.RLock()  # guards both sockets and the counters below
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._accepting = True
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._router: zmq.Socket | None = None
        self._router_fd = -1
        self._pub: Publisher | None = None
        self._sockets_open = False
        self._inflight = 0
        self._close_timeout_s = 2.0
        self.ingest_endpoint = ""
        self.publish_endpoint = ""
        self.accepted = 0
        self.replied = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "ZmqServer":
        """Bind both sockets and start the I/O thread."""
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.RCVHWM, self._cfg.hwm)
        router.setsockopt(zmq.SNDHWM, self._cfg.hwm)
        router.setsockopt(zmq.LINGER, 500)
        try:
            router.bind(self._cfg.ingest)
        except zmq.ZMQError as exc:
            router.close(linger=0)
            raise ConfigError(f"Config key zmq.ingest: cannot bind {self._cfg.ingest}: {exc}.") from exc
        try:
            self._pub = Publisher(self._ctx, self._cfg.publish, hwm=self._cfg.hwm)
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

    def stop_accepting(self) -> None:
        """Answer new requests ``overloaded`` (shutting down); in-flight ones still get replies."""
        self._accepting = False

    def close(self, timeout_s: float = 2.0) -> None:
        """Send the replies still owed (up to ``timeout_s``), close the sockets, stop the thread."""
        self._accepting = False
        self._close_timeout_s = timeout_s
        self._closing.set()
        self._wake()
        stuck = False
        if self._thread is not None:
            self._thread.join(timeout=timeout_s + 0.5)
            stuck = self._thread.is_alive()
        if stuck:
            _log.error("The ZeroMQ I/O thread did not stop; closing its sockets forcibly.")
            self._ctx.destroy(linger=0)
        elif self._own_ctx:
            self._ctx.term()
        locked = self._lock.acquire(timeout=1.0)  # a stuck I/O thread may hold it; close anyway
        try:
            self._sockets_open = False
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        finally:
            if locked:
                self._lock.release()
        _log.info("ZeroMQ server closed: %d frames accepted, %d replies sent.", self.accepted, self.replied)

    def __enter__(self) -> "ZmqServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- worker side
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already; the I/O thread will look at the socket
        except OSError:
            pass  # closed during shutdown

    def _on_result(self, pending: _Pending, result: InferenceResult) -> None:
        """Called from the thread that produced the result (a worker): encode, send, publish."""
        ready = time.perf_counter_ns()
        req = pending.request
        header, mask = encode_result(
            req.id,
            result,
            stream=req.stream,
            want_mask=req.want_mask,
            want_boxes=req.want_boxes,
            sent_ns=req.sent_ns,
        )
        frames: list[Any] = [*pending.envelope, header]
        if mask is not None:
            frames.append(mask)
        copy = mask is None or mask.nbytes <= _ZERO_COPY_BYTES  # a memcpy beats zero-copy bookkeeping
        with self._lock:
            if not self._sockets_open:
                _log.warning("A reply was ready after the ZeroMQ sockets closed; it is lost.")
                return
            router = self._router
            assert router is not None and self._pub is not None
            try:
                router.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                _log.warning("Reply to a client dropped: its send high-water mark is reached.")
            self._pub.publish(req.stream, header, mask)
            self._inflight -= 1
            self.replied += 1
            # the send may have consumed the edge-triggered notification of new input
            if _input_waiting(router) or (self._closing.is_set() and self._inflight <= 0):
                self._wake()
        if self._metrics is not None and result.status == "ok":
            done = time.perf_counter_ns()
            self._metrics.child(self._metrics.stage_seconds, result.model, "egress").observe((done - ready) / 1e9)
            self._metrics.child(self._metrics.end_to_end_seconds, SOURCE, result.model).observe(
                (done - pending.received_ns) / 1e9
            )

    # ----------------------------------------------------------------- I/O thread
    def _loop(self) -> None:
        router = self._router
        assert router is not None and self._pub is not None
        waiter = select.poll()
        waiter.register(self._router_fd, select.POLLIN)
        waiter.register(self._wake_r, select.POLLIN)
        deadline: float | None = None
        while True:
            if self._closing.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self._close_timeout_s
                if self._inflight <= 0:
                    break
                if time.monotonic() > deadline:
                    _log.warning("Closing with %d replies unsent.", self._inflight)
                    break
            with self._lock:
                for _ in range(_BATCH_RECV):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
                more = _input_waiting(router)
            if more:
                continue  # a burst: keep draining, _BATCH_RECV messages per hold of the lock
            for fd, _ in waiter.poll(50):
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 65536)
                    except BlockingIOError:
                        pass
        with self._lock:
            self._sockets_open = False
            router.close(linger=500)
            self._pub.close()

    def _reply_error(
        self, envelope: list[bytes], request_id: Any, code: str, message: str, stream: str, model: str | None, sent_ns: Any
    ) -> None:
        router = self._router
        assert router is not None and self._pub is not None
        header = encode_error(
            request_id, code, message, stream=stream, model=model, sent_ns=sent_ns if isinstance(sent_ns, int) else None
        )
        if self._metrics is not None:  # counted before the reply leaves, so a client never sees it uncounted
            self._metrics.requests_failed.labels(source=SOURCE, code=code).inc()
        try:
            router.send_multipart([*envelope, header], flags=zmq.NOBLOCK)
        except zmq.Again:
            _log.warning("Error reply dropped: the client's send high-water mark is reached.")
        self._pub.publish(stream, header, None)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """One ROUTER message: validate, submit, or answer with an error. The error boundary."""
        received = time.perf_counter_ns()
        envelope = [frames[0].bytes]
        body = frames[1:]
        if body and len(body[0]) == 0:  # REQ clients (and DEALERs that imitate them) send a delimiter
            envelope.append(b"")
            body = body[1:]
        rid: Any = None
        stream = self._cfg.default_stream
        model: str | None = None
        sent_ns: Any = None
        try:
            if not body:
                raise ProtocolError("bad_header", "The message has no header frame.")
            header = _decode_header(body[0].bytes)
            rid = header.get("id")
            sent_ns = header.get("sent_ns")
            if isinstance(header.get("stream"), str) and 0 < len(header["stream"]) <= _MAX_STREAM_CHARS:
                stream = header["stream"]
            if isinstance(header.get("model"), str):
                model = header["model"][:64]
            _check_version(header)
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
            self._service.submit(
                req.image,
                model=req.model,
                source=SOURCE,
                stream=req.stream,
                callback=functools.partial(self._on_result, pending),
                received_ns=received,
                track_e2e=False,
            )
            self._inflight += 1
            self.accepted += 1
        except ProtocolError as exc:
            self._reply_error(envelope, rid, exc.code, exc.message, stream, model, sent_ns)
        except Exception as exc:  # error boundary of the receiver: log, count, answer, keep serving
            _log.exception("Unexpected failure handling a ZeroMQ request.")
            self._reply_error(envelope, rid, "internal", f"Internal error ({type(exc).__name__}).", stream, model, sent_ns)
