"""Fuzzing the ZeroMQ protocol v1: the parsers, the reply encoders and a running server.

Properties (hypothesis):

* ``parse_header`` of any bytes, and of any JSON-ish text (NaN and
  Infinity, huge integers, lone UTF-16 surrogates in keys and values, deep
  nesting), returns a header that re-encodes as strict UTF-8 JSON with the
  integer ``v == 1``, or raises :class:`ProtocolError` ``bad_header``;
  nothing else.
* ``parse_request`` of any parsed header and frames returns a consistent
  :class:`Request` (a valid stream name, ``want`` within ``mask``/``boxes``/
  ``heatmap``/``probability``, the maps asked for in ``extras``,
  ``sent_ns`` exactly as sent: an integer, or a string of at most 20
  digits) or raises :class:`ProtocolError` with a protocol code;
  ``request_op`` of any header is ``None``, ``"models"`` or ``bad_header``.
* Every reply the daemon can produce for a parsed header (``ok`` with mask
  and boxes, ``dropped``, ``error``, the ``op: models`` reply), and every
  error reply, encodes to strict UTF-8 JSON, even for values no parser
  would let through.

Examples are bounded for CI by a hypothesis settings profile chosen with
``MEDGE_HYPOTHESIS_PROFILE``: ``ci`` (default, 200 examples per property)
or ``release`` (20,000). The release run::

    MEDGE_HYPOTHESIS_PROFILE=release .venv/bin/python -m pytest -q tests/edge/test_zmq_fuzz.py

The last test sends a few hundred seeded random messages (models requests
and string ``sent_ns`` among them) to an in-process daemon through a
DEALER: every one is answered exactly once, the counters add up, and a
valid frame still gets ``ok``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.egress.zmq import (
    ERROR_CODES,
    MAP_FRAMES,
    TOPIC_TERMINATOR,
    encode_error,
    encode_models,
    encode_result,
    topic,
)
from edge.errors import ProtocolError
from edge.ingest.zmq_protocol import (
    MAX_HEADER_DEPTH,
    DEFAULT_WANT,
    OPS,
    Request,
    WANT_VALUES,
    parse_header,
    parse_request,
    request_op,
    valid_stream,
)
from edge.types import Box, ClassScore, InferenceResult

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "release",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("MEDGE_HYPOTHESIS_PROFILE", "ci"))

MODELS = ("tiny-seg", "tiny-det")
SENT_NS_TEXT = re.compile(r"-?[0-9]{1,20}")  # docs/protocol.md: the string form of sent_ns


def _no_constant(name: str) -> Any:
    raise AssertionError(f"the daemon emitted the non-JSON constant {name}")


def strict_json(data: bytes) -> Any:
    """Decode ``data`` as strict UTF-8 JSON (no NaN/Infinity, no lone surrogate); fail otherwise."""
    value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape would raise here
    return value


# ------------------------------------------------------------------ strategies
_chars = st.one_of(st.characters(), st.characters(categories=["Cs"]))  # include lone surrogates
_text = st.text(_chars, max_size=12)
_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, 10**4000]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _text)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=20,
)
_ascii_text = st.text(st.characters(max_codepoint=0x7F), max_size=6)  # control characters included
_field_values = {
    "v": st.one_of(st.just(1), st.just(1.0), st.just(True), st.just("1"), _json),
    "op": st.one_of(st.just("models"), st.none(), st.sampled_from(["Models", "models ", "frame", ""]), _json),
    "id": _json,
    "stream": st.one_of(st.just("probe-1"), _text, _ascii_text, st.just("x" * 129), _json),
    "model": st.one_of(st.sampled_from(MODELS), _text, _json),
    "dtype": st.one_of(st.sampled_from(["uint8", "uint16", "int16", "float32", "complex64"]), _json),
    "shape": st.one_of(
        st.lists(st.integers(min_value=-2, max_value=9), min_size=1, max_size=4),
        st.just([100_000, 100_000]),
        _json,
    ),
    "sent_ns": st.one_of(
        st.integers(min_value=0, max_value=2**63),
        st.from_regex(SENT_NS_TEXT, fullmatch=True),
        st.text(st.sampled_from("0123456789-+ .e\u0661"), max_size=22),
        _json,
    ),
    "want": st.one_of(
        st.just(["mask", "boxes"]),
        st.lists(st.sampled_from(["mask", "boxes", "heatmap", "probability", "foo", "Heatmap", "heatmaps"]),
                 max_size=4),
        st.lists(_text, max_size=3),
        _json,
    ),
}
_headers = st.fixed_dictionaries(
    {}, optional={**_field_values, "extra": _json}
)


def _nested(depth: int, kind: str) -> str:
    opener, closer = ("[", "]") if kind == "list" else ('{"k":', "}")
    inner = "1"
    return opener * depth + inner + closer * depth


def _to_text(value: Any) -> str:
    """JSON text of ``value`` as a client might send it: NaN literals, surrogate escapes, huge ints."""
    return json.dumps(value, allow_nan=True)  # ensure_ascii: lone surrogates become \\udXXX escapes


# ------------------------------------------------------------------ parse_header
def _check_header(raw: bytes) -> dict[str, Any] | None:
    try:
        hdr = parse_header(raw)
    except ProtocolError as exc:
        assert exc.code == "bad_header", exc.code
        assert isinstance(exc.message, str) and exc.message
        exc.message.encode("utf-8")  # the message itself is safe to send
        return None
    assert isinstance(hdr, dict) and type(hdr["v"]) is int and hdr["v"] == 1
    text = json.dumps(hdr, ensure_ascii=False, allow_nan=False)  # finite numbers only
    text.encode("utf-8")  # no lone surrogate anywhere
    return hdr


@PROFILE
@given(st.binary(max_size=512))
def test_parse_header_of_any_bytes(raw: bytes) -> None:
    _check_header(raw)


@PROFILE
@given(_headers)
def test_parse_header_of_any_jsonish_header(header: dict[str, Any]) -> None:
    _check_header(_to_text(header).encode("utf-8"))


@PROFILE
@given(_json, st.integers(min_value=0, max_value=64), st.text(max_size=4))
def test_parse_header_of_mutated_text(value: Any, cut: int, junk: str) -> None:
    text = _to_text({"v": 1, "id": value, "dtype": "uint8", "shape": [2, 2]})
    _check_header(text.encode("utf-8"))
    mutated = text[:cut] + junk + text[cut:]
    _check_header(mutated.encode("utf-8", "surrogatepass"))


@PROFILE
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["list", "dict"]))
def test_parse_header_bounds_nesting(depth: int, kind: str) -> None:
    raw = ('{"v": 1, "id": ' + _nested(depth, kind) + "}").encode()
    hdr = _check_header(raw)
    assert (hdr is not None) == (depth + 1 <= MAX_HEADER_DEPTH)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v":2,"stream":"\\ud800"}',
        b'{"v":1,"\\udfff":1}',
        b'{"v":1,"id":NaN}',
        b'{"v":1,"id":-Infinity}',
        b'{"v":1,"id":1e999}',
        b'{"v":1.0}',
        b'{"v":true}',
        b'{"v":1,"id":' + b"9" * 5000 + b"}",
        b'{"v":1,"id":' + b"1" * 21 + b"}",
        b'{"v":1,"id":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b'{"v":1,"id":"\\\\"' + b"[" * 40 + b"}",  # an escaped backslash then brackets outside the string
    ],
)
def test_parse_header_known_bad(raw: bytes) -> None:
    assert _check_header(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v":1,"id":"\\ud83d\\ude00"}',  # a valid surrogate pair is one character, fine
        b'{"v":1,"id":"\\\\ud800"}',  # an escaped backslash, not a surrogate escape
        b'{"v":1,"id":' + b"1" * 20 + b"}",
        b'{"v":1,"id":"' + b"[" * 100 + b'"}',  # brackets inside a string are not nesting
        b'{"v":1,"id":"\\"' + b"{" * 100 + b'"}',
        b'{"v":1,"id":' + b"[" * 31 + b"]" * 31 + b"}",
    ],
)
def test_parse_header_known_good(raw: bytes) -> None:
    assert _check_header(raw) is not None


# ------------------------------------------------------------------ parse_request
@PROFILE
@given(_headers, st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=300))
def test_parse_request_of_any_header(header: dict[str, Any], n_frames: int, payload: int) -> None:
    hdr = _check_header(_to_text(header).encode("utf-8"))
    if hdr is None:
        return
    frames = [b"hdr", *([b"\0" * payload] * n_frames)]
    try:
        req = parse_request(hdr, frames, models=MODELS, max_pixels=1024, max_frame_bytes=256)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES and exc.code not in ("overloaded", "internal"), exc.code
        exc.message.encode("utf-8")
        return
    assert isinstance(req, Request)
    assert req.image.nbytes == payload and req.image.shape == tuple(hdr["shape"])
    assert req.model in (None, *MODELS) and isinstance(req.stream, str) and req.stream
    assert valid_stream(req.stream) and not re.search(r"[\x00-\x1f\x7f]", req.stream) and len(req.stream) <= 128
    assert topic(req.stream).endswith(TOPIC_TERMINATOR) and topic(req.stream).count(TOPIC_TERMINATOR) == 1
    want = hdr.get("want", list(DEFAULT_WANT))
    assert set(want) <= set(WANT_VALUES)
    assert (req.want_mask, req.want_boxes) == ("mask" in want, "boxes" in want)
    assert req.extras == {w for w in want if w in ("heatmap", "probability")}
    sent = hdr.get("sent_ns")
    assert req.sent_ns == sent and type(req.sent_ns) is type(sent)  # echoed exactly as sent
    assert sent is None or type(sent) is int or SENT_NS_TEXT.fullmatch(sent)


@PROFILE
@given(_headers)
def test_request_op_of_any_header(header: dict[str, Any]) -> None:
    hdr = _check_header(_to_text(header).encode("utf-8"))
    if hdr is None:
        return
    try:
        op = request_op(hdr)
    except ProtocolError as exc:
        assert exc.code == "bad_header" and "op" in exc.message
        assert hdr.get("op") is not None and hdr.get("op") not in OPS
        return
    assert op == hdr.get("op") and op in (None, *OPS)


# ------------------------------------------------------------------ reply encoders
_results = st.one_of(
    st.builds(
        InferenceResult,
        status=st.just("ok"),
        model=st.sampled_from(MODELS),
        model_version=st.just("1"),
        task=st.sampled_from(["segmentation", "detection", "classification"]),
        mask=st.one_of(st.none(), st.just(np.zeros((3, 4), np.uint8))),
        classes=st.one_of(
            st.none(),
            st.lists(st.builds(ClassScore, label=st.sampled_from(["nodule", "normal"]), score=st.floats(0, 1)),
                     max_size=3),
        ),
        decision=st.one_of(st.none(), st.booleans()),
        heatmap=st.one_of(st.none(), st.just(np.full((3, 4), 7, np.uint8))),
        probability=st.one_of(st.none(), st.just(np.full((3, 4), 9, np.uint8))),
        boxes=st.lists(
            st.builds(
                Box,
                label=st.just("lesion"),
                score=st.floats(0, 1),
                x0=st.floats(0, 10),
                y0=st.floats(0, 10),
                x1=st.floats(10, 20),
                y1=st.floats(10, 20),
            ),
            max_size=3,
        ),
        timing_us=st.dictionaries(st.sampled_from(["queue", "infer", "total"]), st.integers(0, 10**9)),
    ),
    st.builds(InferenceResult, status=st.just("dropped"), model=st.sampled_from(MODELS),
              error_message=st.sampled_from(["shed: stream_backlog", "shed: shutdown"])),
    st.builds(InferenceResult, status=st.just("error"), model=st.sampled_from(MODELS),
              error_code=st.sampled_from(ERROR_CODES), error_message=st.text(max_size=40)),
)


@PROFILE
@given(_headers, _results)
def test_every_reply_for_a_parsed_header_encodes(header: dict[str, Any], result: InferenceResult) -> None:
    hdr = _check_header(_to_text(header).encode("utf-8"))
    if hdr is None:
        return
    stream = hdr["stream"] if valid_stream(hdr.get("stream")) else None
    sent = hdr.get("sent_ns")
    sent_ns = sent if type(sent) is int or (isinstance(sent, str) and SENT_NS_TEXT.fullmatch(sent)) else None
    reply = encode_result(hdr.get("id"), result, stream=stream or "default", sent_ns=sent_ns)
    out = strict_json(reply.header)
    assert not reply.substituted, "a parsed header always yields its intended reply"
    assert out["status"] == result.status and out["id"] == hdr.get("id")
    assert out.get("sent_ns") == sent_ns and type(out.get("sent_ns")) is type(sent_ns)
    err = strict_json(encode_error(hdr.get("id"), "bad_shape", "A sentence.", stream=stream, sent_ns=sent_ns))
    assert err["error"]["code"] == "bad_shape" and err["stream"] == stream
    models = strict_json(encode_models(hdr.get("id"), [{"name": m} for m in MODELS], default_model=MODELS[0],
                                       sent_ns=sent_ns))
    assert models["op"] == "models" and models["id"] == hdr.get("id") and models.get("sent_ns") == sent_ns


@PROFILE
@given(_json, _json)
def test_models_reply_never_raises_and_never_emits_invalid_json(request_id: Any, sent_ns: Any) -> None:
    """Even for an id or sent_ns no parser would let through: valid JSON (an internal error at worst)."""
    out = strict_json(encode_models(request_id, [{"name": "m"}], default_model="m", sent_ns=sent_ns))
    assert out["status"] in ("ok", "error") and (out["status"] == "ok") == ("op" in out)


@PROFILE
@given(_json, _text, _results)
def test_encoders_never_raise_and_never_emit_invalid_json(request_id: Any, stream: str, result: InferenceResult) -> None:
    """Even for values a parser would refuse (NaN, lone surrogates, huge ints): valid JSON always."""
    reply = encode_result(request_id, result, stream=stream)
    out = strict_json(reply.header)
    if reply.substituted:
        assert out["status"] == "error" and out["error"]["code"] == "internal" and reply.payload == ()
    # every frame after the header is described by it, in the documented order
    described = [k for k in MAP_FRAMES if isinstance(out.get(k), dict)]
    assert len(reply.payload) == len(described)
    for key, frame in zip(described, reply.payload):
        assert list(frame.shape) == out[key]["shape"] and frame.dtype == np.uint8 and frame.flags.c_contiguous
    assert ("classes" in out) == ("decision" in out) == (out["status"] == "ok" and result.classes is not None)
    strict_json(encode_error(request_id, "bad_header", "A sentence.", stream=stream))


def test_encoder_replaces_a_nan_class_score_with_an_internal_error() -> None:
    res = InferenceResult(status="ok", model="m", task="classification", classes=[ClassScore("nodule", math.nan)],
                          decision=False, heatmap=np.zeros((2, 2), np.uint8))
    reply = encode_result(7, res, stream="s")
    out = strict_json(reply.header)
    assert reply.substituted and out["error"]["code"] == "internal" and reply.payload == ()


def test_encoder_replaces_a_nan_score_with_an_internal_error() -> None:
    res = InferenceResult(status="ok", model="m", boxes=[Box("lesion", math.nan, 0, 0, 1, 1)])
    reply = encode_result(7, res, stream="s")
    out = strict_json(reply.header)
    assert reply.substituted and out["id"] == 7 and out["error"]["code"] == "internal"


# ------------------------------------------------------------------ a running server
@pytest.fixture
def daemon(fixture_engines: Path) -> Iterator[Any]:
    from edge.config import load_config
    from edge.daemon import Daemon

    env = {
        "MEDGE_ENGINES_DIR": str(fixture_engines),
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__DEFAULT_MODEL": "tiny-seg",
        "MEDGE_METRICS__ENABLED": "false",
        "MEDGE_DICOM__ENABLED": "false",
    }
    with Daemon(load_config(None, env=env)) as d:
        yield d


def _random_message(rng: random.Random) -> list[bytes]:
    """One fuzzed message: random bytes, a mutated valid request, a hostile header, a models request,
    a frame with a string ``sent_ns`` (its ``id`` holds it, to check the echo), or a valid request."""
    kind = rng.randrange(8)
    img = np.full((rng.randint(1, 12), rng.randint(1, 12)), rng.randrange(256), np.uint8)
    hdr: dict[str, Any] = {"v": 1, "id": rng.randrange(10**6), "stream": f"s{rng.randrange(3)}",
                           "dtype": "uint8", "shape": list(img.shape)}
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randint(1, 3))]
    if kind == 1:  # one field replaced by a hostile value
        hostile = [float("nan"), float("inf"), 10**30, "\ud800", [[[[[]]]]], {"\udfff": 1}, 1.0, True, None, "",
                   -1, "x" * 200, [1, 2, 3, 4], ["mask", 5], "complex64", "no-such-model", "a\x00b", ["foo"], [],
                   "12a", "1" * 21, "models"]
        hdr[rng.choice(["v", "id", "stream", "model", "dtype", "shape", "sent_ns", "want", "op"])] = rng.choice(hostile)
        return [_to_text(hdr).encode(), img.tobytes()]
    if kind == 2:  # raw hostile text
        return [rng.choice([
            b"[" * rng.randint(30, 3000) + b"]" * 10,
            b'{"v":1,"id":' + b"7" * rng.randint(21, 6000) + b"}",
            b'{"v":1,"id":NaN,"dtype":"uint8","shape":[1,1]}',
            b'{"v":2,"stream":"\\ud800"}',
            b'{"v":1,"stream":"\\udc00","dtype":"uint8","shape":[1,1]}',
            b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
            b"",
        ]), img.tobytes()]
    if kind == 3:  # byte-level corruption of a valid header
        raw = bytearray(_to_text(hdr).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return [bytes(raw), img.tobytes()]
    if kind == 4:  # REQ-style delimiter, then a request or garbage
        return [b"", _to_text(hdr).encode(), img.tobytes()][: rng.randint(1, 3)]
    if kind == 5:  # a models request: plain, with a sent_ns, with a pixels frame, or an unknown op
        models = {"v": 1, "id": hdr["id"], "op": rng.choice(["models", "models", "Models", "list"])}
        if rng.random() < 0.5:
            models["sent_ns"] = str(rng.randrange(10**19))
        return [_to_text(models).encode()] + ([img.tobytes()] if rng.random() < 0.2 else [])
    if kind == 6:  # a frame whose sent_ns is a decimal string, above 2**53 or not
        ns = rng.choice([str(2**53 + rng.randrange(10**6)), str(rng.randrange(10**19)), "-" + str(rng.randrange(99))])
        hdr.update(id={"ns": ns}, sent_ns=ns)
    return [_to_text(hdr).encode(), img.tobytes()]


def _total(reg: Any, name: str, **labels: str) -> float:
    total = 0.0
    for metric in reg.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_running_server_answers_every_fuzzed_message(daemon: Any) -> None:
    rng = random.Random(20261130)
    n, window = 400, 16
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(daemon.zmq.ingest_endpoint)
        sent = received = models_ok = 0
        while received < n:
            while sent < n and sent - received < window:
                sock.send_multipart(_random_message(rng))
                sent += 1
            reply = sock.recv_multipart()  # zmq.Again here: a message went unanswered
            header = reply[1] if reply[0] == b"" else reply[0]
            out = strict_json(header)
            assert out["v"] == 1 and out["status"] in ("ok", "dropped", "error")
            if out["status"] == "error":
                assert out["error"]["code"] in ERROR_CODES and out["error"]["code"] != "internal"
            if out.get("op") == "models":
                assert out["status"] == "ok" and {m["name"] for m in out["models"]} == set(MODELS)
                models_ok += 1
            elif isinstance(out["id"], dict) and "ns" in out["id"] and out["status"] != "error":
                assert out["sent_ns"] == out["id"]["ns"]  # the string came back as that string
            received += 1
        sock.setsockopt(zmq.RCVTIMEO, 300)
        with pytest.raises(zmq.Again):  # exactly one reply each: nothing more arrives
            sock.recv_multipart()
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.send_multipart([json.dumps({"v": 1, "id": "last", "dtype": "uint8", "shape": [4, 4]}).encode(), b"\0" * 16])
        last = json.loads(sock.recv_multipart()[0])
        assert last["id"] == "last" and last["status"] == "ok"
    finally:
        ctx.destroy(linger=0)
    reg = daemon.registry
    deadline = time.monotonic() + 10
    while True:  # the end-to-end histogram is observed just after the reply leaves: poll
        frames = _total(reg, "medge_frames_received_total", source="zmq")
        ok = _total(reg, "medge_end_to_end_seconds_count", source="zmq")
        dropped = _total(reg, "medge_frames_dropped_total")
        failed = _total(reg, "medge_requests_failed_total", source="zmq")
        if frames == ok + dropped or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert frames == ok + dropped, (frames, ok, dropped)
    assert models_ok > 0 and frames + failed + models_ok == n + 1  # a models request is no frame
    assert _total(reg, "medge_replies_lost_total") == 0
    assert _total(reg, "medge_internal_errors_total") == 0


@pytest.mark.parametrize(
    "dtype, shown",
    [(None, "dtype null "), (["uint8"], 'dtype ["uint8"] '), ("complex64", 'dtype "complex64" '),
     ("x" * 100, 'dtype "' + "x" * 31 + '... ')],
)
def test_a_bad_dtype_is_quoted_as_json_and_cut_short(dtype: Any, shown: str) -> None:
    """The message quotes the value as the client wrote it (JSON), never Python's repr, and at most 32 characters."""
    header = {"v": 1, "dtype": dtype, "shape": [2, 2]}
    with pytest.raises(ProtocolError) as err:
        parse_request(header, [b"", b"\0" * 4], models=["m"], default_stream="default",
                      max_pixels=1 << 20, max_frame_bytes=1 << 20)
    assert err.value.code == "bad_dtype" and err.value.message.startswith(shown), err.value.message
