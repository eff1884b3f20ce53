"""ZeroMQ egress: protocol v1 reply encoding and the results PUB socket.

A reply is ``[header]`` or ``[header, mask]`` (see ``docs/protocol.md``);
every reply is also published as ``[stream, header(, mask)]``. These
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
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

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
    "topic",
    "Publisher",
]

_log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
ERROR_CODES = ("bad_header", "bad_shape", "bad_dtype", "payload_size", "unknown_model", "overloaded", "internal")

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
    """

    header: bytes
    mask: np.ndarray | None
    status: str
    substituted: bool


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
    sent_ns: int | None = None,
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
        From the request's ``want``; leave out what was not asked for.
    sent_ns : int, optional
        Echoed when the request carried it (clients measure latency with it).

    Returns
    -------
    EncodedReply
        The header, the mask (or ``None``), the status encoded and whether
        an ``internal`` error replaced a reply that could not be encoded.
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
    if result.status == "ok":
        if want_boxes:
            hdr["boxes"] = [b.to_dict() for b in result.boxes]
        if want_mask and result.mask is not None:
            mask_out = np.ascontiguousarray(result.mask, dtype=np.uint8)
            hdr["mask"] = {"dtype": "uint8", "shape": list(mask_out.shape)}
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
    return EncodedReply(header, mask_out, result.status, False)


def encode_error(
    request_id: Any, code: str, message: str, *, stream: str, model: str | None = None, sent_ns: int | None = None
) -> bytes:
    """Header of an ``error`` reply (no mask); never raises.

    When the reply cannot be encoded, an ``internal`` error reply is
    returned instead (see the module docstring).
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


def topic(stream: str) -> bytes:
    """The PUB topic of ``stream``: its UTF-8 bytes (never raises)."""
    try:
        return stream.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        return str(stream).encode("utf-8", "replace")


class Publisher:
    """The results PUB socket: every reply as ``[stream, header(, mask)]``.

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
    """

    def __init__(
        self, ctx: zmq.Context, endpoint: str, *, hwm: int = 32, sndbuf_bytes: int = PUBLISH_SNDBUF_BYTES
    ) -> None:
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

    def publish(self, stream: str, header: bytes, mask: np.ndarray | None) -> None:
        """Publish one reply (the caller serialises access to the socket)."""
        frames: list[Any] = [topic(stream), header]
        if mask is not None:
            frames.append(mask)
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=mask is None or mask.nbytes <= 128 * 1024)
        except zmq.Again:  # a PUB socket drops instead; kept for safety
            _log.debug("PUB high-water mark reached; a result was not published.")

    def close(self, linger_ms: int = 200) -> None:
        """Close the socket (short linger)."""
        self.socket.close(linger=linger_ms)
