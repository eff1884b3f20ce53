"""ZeroMQ protocol v1 requests: the header parser and the request validator (no sockets here).

:mod:`edge.ingest.zmq` (the ROUTER server) calls these on every message;
they are pure functions of the bytes received, so they are fuzzed apart from
any socket (``tests/edge/test_zmq_fuzz.py``). See ``docs/protocol.md`` for
the wire format.

Hostile input is refused before it can cost much: :func:`parse_header`
refuses, as ``bad_header``, a header over :data:`MAX_HEADER_BYTES`, nesting
deeper than :data:`MAX_HEADER_DEPTH` (a linear pre-scan, run only when the
header has that many brackets, so the recursive JSON parser never sees it),
integers over 20 digits, non-finite numbers and lone UTF-16 surrogates
(checked only when the raw header has a ``\\udXXX`` escape: valid UTF-8
cannot produce one otherwise). On a typical header these checks cost about a
microsecond. A parsed header therefore holds only values every reply can
echo; the reply encoder (:mod:`edge.egress.zmq`) still never emits invalid
JSON.

Examples
--------
>>> hdr = parse_header(b'{"v": 1, "dtype": "uint8", "shape": [1, 2]}')
>>> parse_request(hdr, [b"", b"\\x00\\x01"], models=["m"]).image.tolist()
[[0, 1]]
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import zmq

from edge.egress.zmq import PROTOCOL_VERSION
from edge.errors import ProtocolError
from edge.inference.preprocess import SUPPORTED_DTYPES
from edge.types import EXTRA_OUTPUTS, MAX_STREAM_CHARS, valid_stream

__all__ = [
    "Request",
    "parse_header",
    "parse_request",
    "request_op",
    "decode_header",
    "check_version",
    "check_sent_ns",
    "echo_sent_ns",
    "valid_stream",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "MAX_STREAM_CHARS",
    "OPS",
    "WANT_VALUES",
    "DEFAULT_WANT",
]

MAX_HEADER_BYTES = 65536
MAX_HEADER_DEPTH = 32  # nesting of arrays and objects in a header
_MAX_DEPTH = MAX_HEADER_DEPTH
_MAX_INT_DIGITS = 20  # 2**64 has 20 digits; nanosecond timestamps have 19
_MAX_STREAM_CHARS = MAX_STREAM_CHARS
#: the request operations besides a frame request (a header without ``op``)
OPS = ("models",)
#: what a frame request's ``want`` may list; ``[]`` asks for status and timing only. A value the
#: request's model cannot produce (``heatmap`` from a segmentation model) is ignored, as ``mask`` from
#: a detection model always was; ``op: models`` tells which outputs each model has.
WANT_VALUES = ("mask", "boxes") + EXTRA_OUTPUTS
#: ``want`` when the header has none: the mask and the boxes (the maps cost time: asked for only)
DEFAULT_WANT = ("mask", "boxes")
_EXTRAS = frozenset(EXTRA_OUTPUTS)
_NO_EXTRAS: frozenset[str] = frozenset()
# sent_ns as a decimal string: what an integer of at most 20 digits prints as, and nothing else
_SENT_NS_TEXT = re.compile(r"-?[0-9]{1,20}")
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}


@dataclass(frozen=True)
class Request:
    """One validated frame request."""

    id: Any
    model: str | None
    stream: str
    image: np.ndarray
    want_mask: bool
    want_boxes: bool
    sent_ns: int | str | None  # echoed exactly as given (a decimal string stays a string)
    extras: frozenset[str] = _NO_EXTRAS  # the maps asked for: "heatmap", "probability"


def parse_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode and check the JSON header frame.

    Parameters
    ----------
    frame : bytes or memoryview
        The first frame of a request.

    Returns
    -------
    dict
        The header; every string in it is valid Unicode, every number finite
        and every integer at most 20 digits long.

    Raises
    ------
    ProtocolError
        ``bad_header``: over 64 KiB; not UTF-8 JSON; nested deeper than 32;
        an integer of more than 20 digits, ``NaN``/``Infinity`` or a float
        that overflows; a string (key or value) with a lone UTF-16
        surrogate; not an object; or ``v`` is not the integer 1.

    Examples
    --------
    >>> parse_header(b'{"v": 1, "dtype": "uint8", "shape": [2, 2]}')["shape"]
    [2, 2]
    >>> parse_header(b'{"v": 1.0}')
    Traceback (most recent call last):
    ...
    edge.errors.ProtocolError: Header field v is 1.0; this daemon speaks protocol v1 ("v": 1).
    """
    hdr = decode_header(frame)
    check_version(hdr)
    return hdr


def _reject_constant(name: str) -> Any:
    raise ProtocolError("bad_header", f"The header holds {name}; JSON numbers must be finite.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError("bad_header", "The header holds a number too large for a 64-bit float.")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS and len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ProtocolError("bad_header", f"The header holds an integer of more than {_MAX_INT_DIGITS} digits.")
    return int(text)


# json's C scanner calls these hooks only for floats, integers and NaN/Infinity: a header of a few
# integers pays under a microsecond for the integer bound
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_reject_constant)
# [ and { count +1, ] and } -1, every other byte 0 (read as int8)
_DEPTH_STEPS = bytes(1 if b in b"[{" else 255 if b in b"]}" else 0 for b in range(256))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_depth(raw: bytes) -> None:
    """Reject JSON nested deeper than ``_MAX_DEPTH``, in linear time, before the recursive parser runs."""
    # Drop escaped backslashes, then escaped quotes: the quotes left delimit strings, and the
    # even pieces between them are outside every string (UTF-8 never encodes '"' or '\\' in a
    # multi-byte character, so bytes are safe to scan).
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[0::2])
    steps = np.frombuffer(outside.translate(_DEPTH_STEPS), dtype=np.int8)
    if steps.size and int(np.cumsum(steps, dtype=np.int32).max()) > _MAX_DEPTH:
        raise ProtocolError("bad_header", f"The header is nested deeper than {_MAX_DEPTH} levels.")


def decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    raw = frame if isinstance(frame, bytes) else bytes(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("bad_header", f"The header frame is larger than {MAX_HEADER_BYTES} bytes.")
    if raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH:  # only then can it be nested too deep
        _check_depth(raw)
    try:
        hdr = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("bad_header", f"The header frame is not UTF-8 JSON ({exc.__class__.__name__}).") from exc
    except (RecursionError, ValueError) as exc:  # not expected after the checks above; still bad input
        raise ProtocolError("bad_header", f"The header frame cannot be read ({exc.__class__.__name__}).") from exc
    if not isinstance(hdr, dict):
        raise ProtocolError("bad_header", "The header is not a JSON object.")
    # Valid UTF-8 can only yield a lone surrogate through a \\ud800-style escape: check the
    # decoded strings only when the raw text has such an escape (a valid pair passes).
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(hdr, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(
                "bad_header", "The header holds a lone UTF-16 surrogate escape; strings must be valid Unicode."
            ) from exc
    return hdr


def check_version(hdr: dict[str, Any]) -> None:
    v = hdr.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # 1.0 and true are not the integer 1
        raise ProtocolError("bad_header", f"Header field v is {_short(v)}; this daemon speaks protocol v1 (\"v\": 1).")


def _short(value: Any, limit: int = 32) -> str:
    """A bounded JSON rendering of a header value, for error messages."""
    try:
        text = json.dumps(value)  # ASCII: a message never carries an unencodable character
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dims(shape: Any, max_pixels: int) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) not in (2, 3):
        raise ProtocolError("bad_shape", f"shape {_short(shape)} is not [H, W] or [H, W, C].")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError("bad_shape", f"shape {_short(shape)} has a non-integer dimension.")
    if min(shape) < 1:
        raise ProtocolError("bad_shape", f"shape {_short(shape)} has a dimension below 1.")
    if len(shape) == 3 and shape[2] not in (1, 3):
        raise ProtocolError("bad_shape", f"shape {_short(shape)}: C must be 1 or 3, not {shape[2]}.")
    if shape[0] * shape[1] > max_pixels:
        raise ProtocolError(
            "bad_shape", f"shape {_short(shape)} has {shape[0] * shape[1]} pixels; the limit is {max_pixels}."
        )
    return tuple(shape)


def request_op(header: dict[str, Any]) -> str | None:
    """The header's ``op`` (one of :data:`OPS`), or ``None`` for a frame request (``op`` absent or null).

    Raises
    ------
    ProtocolError
        ``bad_header`` for any other ``op``.

    Examples
    --------
    >>> request_op({"v": 1, "op": "models"}), request_op({"v": 1})
    ('models', None)
    """
    op = header.get("op")
    if op is None or (isinstance(op, str) and op in OPS):
        return op
    raise ProtocolError(
        "bad_header",
        f"Header field op is {_short(op)}; known operations: {', '.join(map(json.dumps, OPS))} "
        "(leave op out for a frame request).",
    )


def check_sent_ns(value: Any) -> int | str | None:
    """``sent_ns`` as it will be echoed, or ``ProtocolError`` ``bad_header``."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value  # parse_header already bounds integers to 20 digits
    if isinstance(value, str) and _SENT_NS_TEXT.fullmatch(value):
        return value
    raise ProtocolError(
        "bad_header",
        f"Header field sent_ns is {_short(value)}; it must be an integer, or a string of 1 to 20 decimal "
        "digits with an optional leading '-'.",
    )


def echo_sent_ns(value: Any) -> int | str | None:
    """``sent_ns`` to echo in an error reply: the value when valid, else ``None``."""
    try:
        return check_sent_ns(value)
    except ProtocolError:
        return None


def _checked_dtype(header: Mapping[str, Any]) -> str:
    """The header's ``dtype``: ``bad_header`` when missing, ``bad_dtype`` (quoted as JSON) when unsupported."""
    if "dtype" not in header:
        raise ProtocolError("bad_header", "Header field dtype is missing.")
    dtype = header["dtype"]
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        shown = json.dumps(dtype)  # as the client wrote it: JSON, not Python's repr ("None", "['uint8']")
        shown = shown if len(shown) <= 34 else shown[:32] + "..."
        raise ProtocolError("bad_dtype", f"dtype {shown} is not one of {', '.join(SUPPORTED_DTYPES)}.")
    return dtype


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
    if not valid_stream(stream):
        raise ProtocolError(
            "bad_header",
            f"Header field stream is {_short(stream)}; it must be a string of 1 to {_MAX_STREAM_CHARS} "
            "characters without control characters (U+0000 to U+001F, U+007F to U+009F) or line separators "
            "(U+2028, U+2029).",
        )
    want = header.get("want", DEFAULT_WANT)
    if not isinstance(want, (list, tuple)) or not all(isinstance(w, str) for w in want):
        raise ProtocolError("bad_header", f"Header field want is {_short(want)}; it must be a list of strings.")
    unknown = [w for w in want if w not in WANT_VALUES]
    if unknown:
        raise ProtocolError(
            "bad_header",
            f"Header field want has {_short(unknown[0])}; it may list {', '.join(map(json.dumps, WANT_VALUES))} "
            "([] for status and timing only).",
        )
    sent_ns = check_sent_ns(header.get("sent_ns"))
    dtype = _checked_dtype(header)
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
    if dt.kind == "f" and not np.isfinite(image).all():  # a NaN makes every normalisation meaningless
        raise ProtocolError("bad_dtype", f"The {dtype} pixels hold NaN or infinity.")
    return Request(
        id=header.get("id"),
        model=model,
        stream=stream,
        image=image,
        want_mask="mask" in want,
        want_boxes="boxes" in want,
        sent_ns=sent_ns,
        extras=_NO_EXTRAS if want is DEFAULT_WANT else _EXTRAS.intersection(want),
    )
