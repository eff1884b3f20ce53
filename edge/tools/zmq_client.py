"""A ZeroMQ protocol v1 client: one DEALER socket, pipelining allowed; and a PUB subscriber.

Used by ``medge send zmq``, ``medge demo`` and ``medge bench zmq``; see
``docs/protocol.md`` for the wire format. The client sets ``ZMQ_IMMEDIATE``
so that nothing is queued while no daemon is connected: a send to a daemon
that is down fails at once (:class:`NotConnectedError`) instead of waiting
in a buffer, which is how the load generator tells "down" from "slow".

:class:`ZmqSubscriber` reads the daemon's PUB socket. It subscribes to
:func:`topic_for` ``(stream)``, the stream name and a NUL byte, so that
``probe-1`` never receives ``probe-10``'s results.

Examples
--------
>>> import numpy as np
>>> frames = encode_request(np.zeros((2, 3), np.uint8), req_id=7, model="m", stream="s")
>>> import json; json.loads(frames[0])["shape"]
[2, 3]
>>> json.loads(encode_request(np.zeros((1, 1), np.uint8), req_id=1, sent_ns="9007199254740993")[0])["sent_ns"]
'9007199254740993'
>>> topic_for("probe-1")
b'probe-1\\x00'
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zmq

from edge.errors import MedgeError, ProtocolError
from edge.ops.curve import CurveClientKeys

__all__ = [
    "PROTOCOL_VERSION",
    "TOPIC_TERMINATOR",
    "MAP_FRAMES",
    "NotConnectedError",
    "Reply",
    "Published",
    "encode_request",
    "encode_models_request",
    "decode_reply",
    "topic_for",
    "ZmqClient",
    "ZmqSubscriber",
]

_log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: ends every PUB topic frame (docs/protocol.md, "PUB")
TOPIC_TERMINATOR = b"\x00"
#: the map frames after a reply's header, in this order, each present only when the header describes it
MAP_FRAMES = ("mask", "probability", "heatmap")
_DTYPES = ("uint8", "uint16", "int16", "float32")


class NotConnectedError(MedgeError):
    """No daemon is connected at the endpoint (the send was not queued)."""


@dataclass
class Reply:
    """One decoded reply.

    ``mask``, ``probability`` and ``heatmap`` are the map frames the header
    describes (uint8 ``[H, W]`` at the request's resolution), ``None`` when
    absent: the label mask (segmentation), the foreground probability
    ``round(255 p)`` (segmentation, ``want`` ``probability``) and the class
    activation map of ``classes[0]`` (classification, ``want`` ``heatmap``).
    """

    id: str
    status: str
    header: dict[str, Any]
    mask: np.ndarray | None = None
    recv_ns: int = 0  # time.perf_counter_ns() when it was received
    probability: np.ndarray | None = None
    heatmap: np.ndarray | None = None

    @property
    def timing_us(self) -> dict[str, int]:
        """The server-side stage timings (empty if the daemon sent none)."""
        t = self.header.get("timing_us") or {}
        return t if isinstance(t, dict) else {}

    @property
    def error_code(self) -> str | None:
        """``error.code`` for ``status == "error"`` (``overloaded`` etc.), else ``None``."""
        err = self.header.get("error")
        if isinstance(err, dict):
            return str(err.get("code", "")) or None
        return None

    @property
    def boxes(self) -> list[dict[str, Any]]:
        """Detections in input pixel coordinates."""
        b = self.header.get("boxes") or []
        return b if isinstance(b, list) else []

    @property
    def classes(self) -> list[dict[str, Any]]:
        """A classification's ``{"label", "score"}`` (calibrated probabilities), best first; empty otherwise."""
        c = self.header.get("classes") or []
        return [x for x in c if isinstance(x, dict)] if isinstance(c, list) else []

    @property
    def decision(self) -> bool | None:
        """A classification's decision (``classes[0]`` at or above the model's threshold); ``None`` otherwise."""
        d = self.header.get("decision")
        return d if isinstance(d, bool) else None


def encode_request(
    image: np.ndarray,
    *,
    req_id: str | int,
    model: str | None = None,
    stream: str | None = None,
    want: Sequence[str] | None = None,
    sent_ns: int | str | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> list[Any]:
    """The two frames ``[header, pixels]`` of one request.

    The pixel frame is the array itself (C-contiguous, sent without a copy
    when large). ``sent_ns`` defaults to ``time.time_ns()``; a string (a
    decimal integer, as a JavaScript client sends it) goes as given and
    comes back as given.
    """
    arr = np.asarray(image)
    if arr.dtype.name not in _DTYPES:
        raise ValueError(f"dtype {arr.dtype.name} is not one of {_DTYPES}.")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": req_id,
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "sent_ns": time.time_ns() if sent_ns is None else sent_ns if isinstance(sent_ns, str) else int(sent_ns),
    }
    if stream is not None:
        header["stream"] = stream
    if model is not None:
        header["model"] = model
    if want is not None:
        header["want"] = list(want)
    if spacing_mm is not None:
        header["spacing_mm"] = [float(v) for v in spacing_mm]
    return [json.dumps(header, separators=(",", ":")).encode("utf-8"), arr]


def encode_models_request(req_id: str | int | None = None) -> list[bytes]:
    """The one frame of ``{"v": 1, "op": "models"}``: which models the daemon serves, and their inputs."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": "models"}
    if req_id is not None:
        header["id"] = req_id
    return [json.dumps(header, separators=(",", ":")).encode("utf-8")]


def topic_for(stream: str) -> bytes:
    """The exact PUB subscription of ``stream``: its UTF-8 name and :data:`TOPIC_TERMINATOR`."""
    return stream.encode("utf-8") + TOPIC_TERMINATOR


def _map(data: bytes, info: dict[str, Any], key: str) -> np.ndarray:
    """One map frame as the array its header entry describes."""
    try:
        shape = tuple(int(v) for v in info.get("shape", ()))
        return np.frombuffer(data, dtype=np.dtype(str(info.get("dtype", "uint8")))).reshape(shape)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_shape", f"Reply {key} does not match its header: {exc}.") from exc


def decode_reply(frames: Sequence[bytes | zmq.Frame], recv_ns: int = 0) -> Reply:
    """Parse ``[header, maps...]``; raises :class:`ProtocolError` if malformed.

    The frames after the header are the maps the header describes, in
    :data:`MAP_FRAMES` order (``mask``, ``probability``, ``heatmap``); a
    described map without its frame is left ``None``. A leading empty
    delimiter frame (a daemon answering a REQ-style envelope) is skipped.
    """
    parts = [f.bytes if isinstance(f, zmq.Frame) else f for f in frames]
    if parts and parts[0] == b"":
        parts = parts[1:]
    if not parts:
        raise ProtocolError("bad_header", "Reply has no frames.")
    try:
        header = json.loads(parts[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("bad_header", f"Reply header is not JSON: {exc}.") from exc
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "Reply header is not a JSON object.")
    maps: dict[str, np.ndarray] = {}
    rest = iter(parts[1:])
    for key in MAP_FRAMES:
        info = header.get(key)
        if isinstance(info, dict):
            data = next(rest, None)
            if data is None:
                break
            maps[key] = _map(data, info, key)
    return Reply(
        id=str(header.get("id", "")),
        status=str(header.get("status", "")),
        header=header,
        mask=maps.get("mask"),
        recv_ns=recv_ns,
        probability=maps.get("probability"),
        heatmap=maps.get("heatmap"),
    )


@dataclass
class ZmqClient:
    """One DEALER connection to a daemon's ROUTER; a context manager.

    Parameters
    ----------
    endpoint : str
        e.g. ``tcp://127.0.0.1:5555``.
    context : zmq.Context, optional
        Shared context (default: the process-wide instance).
    sndhwm, rcvhwm : int
        High-water marks; the load generator bounds in-flight requests
        itself, these only cap memory.
    curve : CurveClientKeys, optional
        Connect with CURVE (the daemon's public key and this client's key
        pair), for a daemon with ``[zmq] curve_server_key`` set.
    """

    endpoint: str
    context: zmq.Context | None = None
    sndhwm: int = 1000
    rcvhwm: int = 10000
    curve: CurveClientKeys | None = None
    _sock: zmq.Socket | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._sock = self._open()

    def _open(self) -> zmq.Socket:
        ctx = self.context or zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.SNDHWM, self.sndhwm)
        s.setsockopt(zmq.RCVHWM, self.rcvhwm)
        try:
            if self.curve is not None:
                self.curve.apply(s)
        except MedgeError:
            s.close(0)
            raise
        try:
            s.connect(self.endpoint)
        except zmq.ZMQError as exc:
            s.close(0)
            raise MedgeError(f"Cannot connect to {self.endpoint!r}: {exc}.") from exc
        return s

    def reconnect(self) -> None:
        """Drop the socket (and every reply still owed to it) and connect a fresh one.

        The recovery after a reply timed out (docs/protocol.md, "Timeouts and
        reconnecting"): a late reply to the old socket can no longer arrive
        and be mistaken for the answer to a later request.
        """
        self.close()
        self._sock = self._open()

    @property
    def socket(self) -> zmq.Socket:
        """The underlying DEALER socket (for polling)."""
        if self._sock is None:
            raise MedgeError("The client is closed.")
        return self._sock

    def wait_connected(self, timeout_s: float) -> bool:
        """True once a daemon accepted the TCP connection (POLLOUT with IMMEDIATE)."""
        return bool(self.socket.poll(int(timeout_s * 1000), zmq.POLLOUT) & zmq.POLLOUT)

    def send(self, image: np.ndarray, *, req_id: str | int, model: str | None = None,
             stream: str | None = None, want: Sequence[str] | None = None,
             sent_ns: int | str | None = None) -> int:
        """Send one request without waiting; return its ``perf_counter_ns`` send time.

        Raises
        ------
        NotConnectedError
            When no daemon is connected (nothing was sent).
        """
        frames = encode_request(image, req_id=req_id, model=model, stream=stream, want=want, sent_ns=sent_ns)
        t = time.perf_counter_ns()
        try:
            self.socket.send(frames[0], zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.Again as exc:
            raise NotConnectedError(f"No daemon is connected at {self.endpoint}.") from exc
        # The first part is queued, so the pipe exists: the second part cannot block.
        self.socket.send(frames[1], copy=frames[1].nbytes < 65536)
        return t

    def recv(self, timeout_s: float | None = None) -> Reply | None:
        """The next reply, or ``None`` after ``timeout_s`` (``None`` waits forever, 0 polls)."""
        if timeout_s is not None and not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        frames = self.socket.recv_multipart(copy=True)
        return decode_reply(frames, time.perf_counter_ns())

    def recv_nowait(self) -> Reply | None:
        """A reply if one is already waiting, else ``None``."""
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return None
        return decode_reply(frames, time.perf_counter_ns())

    def request(self, image: np.ndarray, timeout_s: float = 10.0, **kw: Any) -> Reply:
        """Send one frame and wait for its reply (raises :class:`MedgeError` on timeout)."""
        req_id = kw.pop("req_id", f"r{time.perf_counter_ns()}")
        if not self.wait_connected(timeout_s):
            raise NotConnectedError(f"No daemon is connected at {self.endpoint} after {timeout_s:g} s.")
        self.send(image, req_id=req_id, **kw)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            rep = self.recv(max(0.0, left))
            if rep is None:
                raise MedgeError(f"No reply from {self.endpoint} within {timeout_s:g} s.")
            if rep.id == str(req_id):
                return rep

    def models(self, timeout_s: float = 10.0) -> Reply:
        """Ask which models the daemon serves (``op: models``); the reply's ``header["models"]`` lists them.

        Raises
        ------
        NotConnectedError, MedgeError
            No daemon connected, or no reply within ``timeout_s``.
        """
        req_id = f"models-{time.perf_counter_ns()}"
        if not self.wait_connected(timeout_s):
            raise NotConnectedError(f"No daemon is connected at {self.endpoint} after {timeout_s:g} s.")
        try:
            self.socket.send(encode_models_request(req_id)[0], zmq.NOBLOCK)
        except zmq.Again as exc:
            raise NotConnectedError(f"No daemon is connected at {self.endpoint}.") from exc
        deadline = time.monotonic() + timeout_s
        while True:
            rep = self.recv(max(0.0, deadline - time.monotonic()))
            if rep is None:
                raise MedgeError(f"No reply from {self.endpoint} within {timeout_s:g} s.")
            if rep.id == req_id:
                return rep

    def close(self) -> None:
        """Close the socket (pending messages are discarded)."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "ZmqClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Published:
    """One message from the daemon's PUB socket."""

    stream: str  # the topic frame without its terminator
    reply: Reply


@dataclass
class ZmqSubscriber:
    """A SUB connection to a daemon's PUB socket; a context manager.

    Parameters
    ----------
    endpoint : str
        e.g. ``tcp://127.0.0.1:5556``.
    streams : sequence of str, optional
        Streams to receive, each matched exactly (:func:`topic_for`); ``None``
        or empty receives every stream.
    context : zmq.Context, optional
    curve : CurveClientKeys, optional
        For a daemon with ``[zmq] curve_server_key`` set.

    Notes
    -----
    A subscription takes effect only once it has reached the daemon (the
    *slow joiner*): results published before then are not delivered. Wait
    for the first message of a stream before relying on seeing all of them.
    """

    endpoint: str
    streams: Sequence[str] | None = None
    context: zmq.Context | None = None
    curve: CurveClientKeys | None = None
    _sock: zmq.Socket | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        ctx = self.context or zmq.Context.instance()
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve is not None:
                self.curve.apply(s)
            for t in [topic_for(n) for n in self.streams] if self.streams else [b""]:
                s.setsockopt(zmq.SUBSCRIBE, t)
            s.connect(self.endpoint)
        except MedgeError:
            s.close(0)
            raise
        except zmq.ZMQError as exc:
            s.close(0)
            raise MedgeError(f"Cannot connect to {self.endpoint!r}: {exc}.") from exc
        self._sock = s

    @property
    def socket(self) -> zmq.Socket:
        """The underlying SUB socket (for polling)."""
        if self._sock is None:
            raise MedgeError("The subscriber is closed.")
        return self._sock

    def recv(self, timeout_s: float | None = None) -> Published | None:
        """The next published result, or ``None`` after ``timeout_s`` (``None`` waits forever)."""
        if timeout_s is not None and not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        frames = self.socket.recv_multipart(copy=True)
        if len(frames) < 2:
            raise ProtocolError("bad_header", f"A published message has {len(frames)} frame(s); expected 2 or more.")
        name = frames[0].removesuffix(TOPIC_TERMINATOR).decode("utf-8", "replace")
        return Published(name, decode_reply(frames[1:], time.perf_counter_ns()))

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "ZmqSubscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
