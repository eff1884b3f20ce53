"""ZeroMQ egress: protocol v1 reply encoding and the results PUB socket.

A reply is ``[header]`` or ``[header, mask]`` (see ``docs/protocol.md``);
every reply is also published as ``[stream, header(, mask)]``. These
functions only encode; the socket work happens in the ingest I/O thread
(:mod:`edge.ingest.zmq`), the one thread that owns the sockets.

Examples
--------
>>> from edge.types import InferenceResult
>>> hdr, mask = encode_result(7, InferenceResult(status="dropped", model="m"), stream="s")
>>> import json; json.loads(hdr)["status"], mask is None
('dropped', True)
>>> json.loads(encode_error("x", "bad_shape", "no.", stream="s"))["error"]["code"]
'bad_shape'
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import zmq

from edge.types import InferenceResult

__all__ = ["PROTOCOL_VERSION", "ERROR_CODES", "encode_result", "encode_error", "Publisher"]

_log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
ERROR_CODES = ("bad_header", "bad_shape", "bad_dtype", "payload_size", "unknown_model", "overloaded", "internal")

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_result(
    request_id: Any,
    result: InferenceResult,
    *,
    stream: str,
    want_mask: bool = True,
    want_boxes: bool = True,
    sent_ns: int | None = None,
) -> tuple[bytes, np.ndarray | None]:
    """Reply header (UTF-8 JSON) and optional mask for one result.

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
    header : bytes
    mask : numpy.ndarray or None
        uint8 ``[H, W]``, C-contiguous, when the reply carries a mask.
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
    return _dumps(hdr).encode("utf-8"), mask_out


def encode_error(
    request_id: Any, code: str, message: str, *, stream: str, model: str | None = None, sent_ns: int | None = None
) -> bytes:
    """Header of an ``error`` reply (no mask)."""
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
    return _dumps(hdr).encode("utf-8")


class Publisher:
    """The results PUB socket: every reply as ``[stream, header(, mask)]``.

    Never blocks: a slow subscriber loses messages past the high-water mark
    (ZeroMQ PUB semantics), the daemon does not slow down for it.

    Parameters
    ----------
    ctx : zmq.Context
    endpoint : str
        Where to bind (``tcp://127.0.0.1:5556``; ``:*`` picks a port).
    hwm : int
        Send high-water mark, in messages.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, *, hwm: int = 10000) -> None:
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 200)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError:
            self.socket.close(linger=0)
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, stream: str, header: bytes, mask: np.ndarray | None) -> None:
        """Publish one reply (from the thread that owns the socket)."""
        frames: list[Any] = [stream.encode("utf-8"), header]
        if mask is not None:
            frames.append(mask)
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=mask is None or mask.nbytes <= 128 * 1024)
        except zmq.Again:
            _log.debug("PUB high-water mark reached; a result was not published.")

    def close(self) -> None:
        """Close the socket (short linger)."""
        self.socket.close()
