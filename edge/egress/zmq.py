"""ZeroMQ egress: protocol v1 reply encoding and the results PUB socket.

A reply is ``[header]`` followed by the map frames its header describes, in
the fixed order ``mask``, ``probability``, ``heatmap`` (each present only
when described; see ``docs/protocol.md``), so a client that reads the mask
as frame 2 is unaffected by the others. Every reply to a frame request
whose stream is known is also published as ``[topic, header, maps...]``
(byte-identical frames), the topic being the stream name followed by
one NUL byte (:func:`topic`), so that a subscription to ``probe-1\\0``
cannot match ``probe-10``. The answer to ``{"v": 1, "op": "models"}``
(:func:`encode_models`, entries from
:func:`edge.egress.zmq_catalogue.describe_model`) is a reply only. These
functions only encode; the socket work happens in :mod:`edge.ingest.zmq`.

The encoders never raise and never emit invalid JSON: they encode with
``allow_nan=False`` into strict UTF-8, and a reply that cannot be encoded
(a non-finite number, a lone UTF-16 surrogate, a value JSON cannot hold) is
replaced by an ``internal`` error reply, with ``id``, ``stream`` or
``model`` set to ``null`` where that value was the problem, and as a last
resort by a constant minimal error reply. The caller learns of the
substitution through :attr:`EncodedReply.substituted` (to count it in
``medge_replies_lost_total{reason="encode"}``).

Examples
--------
>>> from edge.types import InferenceResult
>>> r = encode_result(7, InferenceResult(status="dropped", model="m"), stream="s")
>>> import json; json.loads(r.header)["status"], r.mask is None, r.substituted
('dropped', True, False)
>>> json.loads(encode_error("x", "bad_shape", "no.", stream="s"))["error"]["code"]
'bad_shape'
>>> r = encode_result("\\ud800", InferenceResult(status="ok", model="m"), stream="s")
>>> hdr = json.loads(r.header); hdr["id"], hdr["error"]["code"], r.substituted
(None, 'internal', True)
>>> topic("probe-1")
b'probe-1\\x00'
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple, Sequence

import numpy as np
import zmq

from edge.types import InferenceResult

__all__ = [
    "PROTOCOL_VERSION",
    "ERROR_CODES",
    "PUBLISH_SNDBUF_BYTES",
    "EncodedReply",
    "encode_result",
    "encode_error",
    "encode_models",
    "MAP_FRAMES",
    "TOPIC_TERMINATOR",
    "topic",
    "Publisher",
    "copy_is_cheaper",
    "ZERO_COPY_BYTES",
]

_log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: the map frames a reply may carry after its header, in this order, each described by the header key
#: of the same name (``{"dtype": "uint8", "shape": [H, W]}``) and present only when described
MAP_FRAMES = ("mask", "probability", "heatmap")
ERROR_CODES = ("bad_header", "bad_shape", "bad_dtype", "payload_size", "unknown_model", "overloaded", "internal")
#: ends every PUB topic frame; a stream name cannot hold it (control characters are refused)
TOPIC_TERMINATOR = b"\x00"

#: the PUB socket's kernel send buffer (SO_SNDBUF) per subscriber connection; fixed, so Linux
#: does not auto-grow it to several MiB for a subscriber that stopped reading
PUBLISH_SNDBUF_BYTES = 1024 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_ENCODE_ERRORS = (ValueError, TypeError, RecursionError, OverflowError)  # UnicodeEncodeError is a ValueError
_UNENCODABLE_MESSAGE = "The reply could not be encoded as UTF-8 JSON; the result is lost."
#: the last resort: a constant that always encodes
_MINIMAL_ERROR = (
    b'{"v":1,"id":null,"status":"error","stream":null,'
    b'"error":{"code":"internal","message":"The reply could not be encoded as UTF-8 JSON."}}'
)


class EncodedReply(NamedTuple):
    """One encoded reply.

    Attributes
    ----------
    header : bytes
        UTF-8 JSON, always valid.
    mask : numpy.ndarray or None
        uint8 ``[H, W]``, C-contiguous, when the reply carries a mask.
    status : str
        The status actually encoded (``internal`` errors replace replies
        that could not be encoded).
    substituted : bool
        True when the intended reply could not be encoded and an
        ``internal`` error reply was encoded instead.
    extras : tuple of numpy.ndarray
        The ``probability`` and ``heatmap`` frames the header describes, in
        :data:`MAP_FRAMES` order (uint8 ``[H, W]``, C-contiguous); usually empty.
    """

    header: bytes
    mask: np.ndarray | None
    status: str
    substituted: bool
    extras: tuple[np.ndarray, ...] = ()

    @property
    def payload(self) -> tuple[np.ndarray, ...]:
        """The frames after the header, in :data:`MAP_FRAMES` order."""
        return self.extras if self.mask is None else (self.mask, *self.extras)


def _encodes(value: Any) -> bool:
    try:
        _dumps(value).encode("utf-8")
    except _ENCODE_ERRORS:
        return False
    return True


def _encode(hdr: dict[str, Any]) -> bytes | None:
    """``hdr`` as UTF-8 JSON, or ``None`` when it cannot be encoded."""
    try:
        return _dumps(hdr).encode("utf-8")
    except _ENCODE_ERRORS:
        return None


def _internal_error(request_id: Any, stream: Any, model: Any, message: str = _UNENCODABLE_MESSAGE) -> bytes:
    """An ``internal`` error reply, nulling each echoed value that cannot be encoded."""
    hdr = {
        "v": PROTOCOL_VERSION,
        "id": request_id if _encodes(request_id) else None,
        "status": "error",
        "stream": stream if isinstance(stream, str) and _encodes(stream) else None,
        "error": {"code": "internal", "message": message},
    }
    if model is not None:
        hdr["model"] = model if isinstance(model, str) and _encodes(model) else None
    return _encode(hdr) or _MINIMAL_ERROR


def encode_result(
    request_id: Any,
    result: InferenceResult,
    *,
    stream: str,
    want_mask: bool = True,
    want_boxes: bool = True,
    sent_ns: int | str | None = None,
) -> EncodedReply:
    """Reply header (UTF-8 JSON) and optional mask for one result; never raises.

    Parameters
    ----------
    request_id
        The request's ``id``, echoed unchanged.
    result : InferenceResult
        ``ok``, ``dropped`` or ``error``.
    stream : str
        The request's stream (echoed; also the PUB topic).
    want_mask, want_boxes : bool
        From the request's ``want``; leave out what was not asked for. The
        ``probability`` and ``heatmap`` maps are in the reply when the
        result carries them (they are computed only when asked for); a
        classification's ``classes`` and ``decision`` always are.
    sent_ns : int or str, optional
        Echoed exactly as the request carried it (an integer, or a decimal
        string for clients whose JSON numbers are doubles); clients measure
        latency with it.

    Returns
    -------
    EncodedReply
        The header, the mask (or ``None``), the status encoded, whether an
        ``internal`` error replaced a reply that could not be encoded, and
        the other map frames.
    """
    hdr: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "status": result.status,
        "stream": stream,
        "model": result.model,
    }
    if result.model_version:
        hdr["model_version"] = result.model_version
    if result.task:
        hdr["task"] = result.task
    mask_out: np.ndarray | None = None
    extras: tuple[np.ndarray, ...] = ()
    if result.status == "ok":
        if want_boxes:
            hdr["boxes"] = [b.to_dict() for b in result.boxes]
        if result.classes is not None:
            hdr["classes"] = [c.to_dict() for c in result.classes]
            hdr["decision"] = bool(result.decision)
        if want_mask and result.mask is not None:
            mask_out = _map_frame(hdr, "mask", result.mask)
        if result.probability is not None or result.heatmap is not None:
            extras = _extra_frames(hdr, result)
    elif result.status == "dropped":
        hdr["reason"] = (result.error_message or "shed").removeprefix("shed: ")
    else:
        hdr["error"] = {"code": result.error_code or "internal", "message": result.error_message or ""}
    if result.timing_us:
        hdr["timing_us"] = result.timing_us
    if sent_ns is not None:
        hdr["sent_ns"] = sent_ns
    header = _encode(hdr)
    if header is None:
        _log.debug("A %s reply could not be encoded; an internal error reply replaces it.", result.status)
        return EncodedReply(_internal_error(request_id, stream, result.model), None, "error", True)
    return EncodedReply(header, mask_out, result.status, False, extras)


def _map_frame(hdr: dict[str, Any], key: str, values: np.ndarray) -> np.ndarray:
    """``values`` as a C-contiguous uint8 frame, described under ``hdr[key]``."""
    frame = np.ascontiguousarray(values, dtype=np.uint8)
    hdr[key] = {"dtype": "uint8", "shape": list(frame.shape)}
    return frame


def _extra_frames(hdr: dict[str, Any], result: InferenceResult) -> tuple[np.ndarray, ...]:
    """The ``probability`` and ``heatmap`` frames the result carries, in :data:`MAP_FRAMES` order."""
    frames = []
    for key in MAP_FRAMES[1:]:
        values = getattr(result, key)
        if values is not None:
            frames.append(_map_frame(hdr, key, values))
    return tuple(frames)


def encode_error(
    request_id: Any,
    code: str,
    message: str,
    *,
    stream: str | None,
    model: str | None = None,
    sent_ns: int | str | None = None,
) -> bytes:
    """Header of an ``error`` reply (no mask); never raises.

    ``stream`` is ``None`` when the request's stream is unknown or invalid
    (the reply then says ``"stream": null``). When the reply cannot be
    encoded, an ``internal`` error reply is returned instead (see the
    module docstring).
    """
    hdr: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "status": "error",
        "stream": stream,
        "error": {"code": code, "message": message},
    }
    if model is not None:
        hdr["model"] = model
    if sent_ns is not None:
        hdr["sent_ns"] = sent_ns
    header = _encode(hdr)
    if header is None:
        return _internal_error(request_id, stream, model)
    return header


def encode_models(
    request_id: Any,
    models: Sequence[dict[str, Any]],
    *,
    default_model: str | None,
    sent_ns: int | str | None = None,
) -> bytes:
    """The reply to ``{"v": 1, "op": "models"}``; never raises.

    Parameters
    ----------
    request_id
        The request's ``id``, echoed.
    models : sequence of dict
        One entry per served model, from :func:`edge.egress.zmq_catalogue.describe_model`.
    default_model : str or None
        The model a frame request without ``model`` runs on.
    sent_ns : int or str, optional
        Echoed as given.

    Examples
    --------
    >>> hdr = json.loads(encode_models(3, [{"name": "m"}], default_model="m"))
    >>> hdr["op"], hdr["status"], hdr["default_model"], [m["name"] for m in hdr["models"]]
    ('models', 'ok', 'm', ['m'])
    """
    hdr: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "status": "ok",
        "op": "models",
        "default_model": default_model,
        "models": list(models),
    }
    if sent_ns is not None:
        hdr["sent_ns"] = sent_ns
    return _encode(hdr) or _internal_error(request_id, None, None)


#: map frames up to this many bytes in all are copied into the message: a memcpy beats zero-copy bookkeeping
ZERO_COPY_BYTES = 128 * 1024


def copy_is_cheaper(payload: Sequence[np.ndarray]) -> bool:
    """Whether to send ``payload`` (the map frames) by copy rather than zero-copy (:data:`ZERO_COPY_BYTES`)."""
    if len(payload) == 1:  # the usual reply: one mask
        return int(payload[0].nbytes) <= ZERO_COPY_BYTES
    return sum(int(f.nbytes) for f in payload) <= ZERO_COPY_BYTES


def topic(stream: str, terminated: bool = True) -> bytes:
    """The PUB topic of ``stream``: its UTF-8 bytes and :data:`TOPIC_TERMINATOR` (never raises).

    The terminator makes a subscription to ``topic("probe-1")`` exact: it
    cannot match ``probe-10``, whose topic is ``b"probe-10\\x00"``. A
    subscription to the bare name (a prefix) or to ``b""`` still matches.
    ``terminated=False`` gives the bare name (``[zmq] publish_topic = "bare"``,
    the framing before the terminator was added).
    """
    end = TOPIC_TERMINATOR if terminated else b""
    try:
        return stream.encode("utf-8") + end
    except (UnicodeEncodeError, AttributeError):
        return str(stream).encode("utf-8", "replace") + end


class Publisher:
    """The results PUB socket: every reply as ``[topic(stream), header, maps...]``.

    Never blocks and never slows the daemon: a subscriber that cannot keep
    up loses messages beyond ``hwm`` (ZeroMQ PUB semantics). The daemon holds
    at most about ``hwm`` replies (with their masks) per subscriber that
    stopped reading, plus the kernel's send buffer (``sndbuf_bytes``, fixed
    so that Linux does not grow it). ZeroMQ drops those messages silently
    inside its I/O thread: the daemon cannot see, and so cannot count,
    which subscriber lost what.

    Parameters
    ----------
    ctx : zmq.Context
    endpoint : str
        Where to bind (``tcp://127.0.0.1:5556``; ``:*`` picks a port).
    hwm : int
        Send high-water mark per subscriber, in messages (``[zmq] publish_hwm``).
    sndbuf_bytes : int
        SO_SNDBUF of each subscriber connection.
    terminated : bool
        Topic frame = stream name + NUL (exact subscriptions; the default), or
        the bare name (``[zmq] publish_topic = "bare"``).
    published, dropped : prometheus counters, optional
        ``medge_published_total`` and ``medge_publish_dropped_total{reason}``.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        *,
        hwm: int = 32,
        sndbuf_bytes: int = PUBLISH_SNDBUF_BYTES,
        terminated: bool = True,
        published: Any = None,
        dropped: Any = None,
    ) -> None:
        self.terminated = terminated
        self._published = published
        self._dropped = dropped
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.SNDBUF, sndbuf_bytes)
        self.socket.setsockopt(zmq.LINGER, 200)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError:
            self.socket.close(linger=0)
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, stream: str, header: bytes, payload: Sequence[np.ndarray] = ()) -> None:
        """Publish one reply: its header and map frames (:attr:`EncodedReply.payload`); the caller serialises access."""
        frames: list[Any] = [topic(stream, self.terminated), header, *payload]
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy_is_cheaper(payload))
        except zmq.ZMQError as exc:  # a PUB socket drops at the hwm itself; this is the socket failing
            reason = "closed" if exc.errno in (zmq.ETERM, zmq.ENOTSOCK) else "error"
            _log.debug("A result was not published (%s).", zmq.strerror(exc.errno))
            if self._dropped is not None:
                self._dropped.labels(reason=reason).inc()
            return
        if self._published is not None:
            self._published.inc()

    def close(self, linger_ms: int = 200) -> None:
        """Close the socket (short linger)."""
        self.socket.close(linger=linger_ms)
