"""ZeroMQ protocol v1 against a real daemon on loopback.

The client code here uses only pyzmq, json and numpy, following
docs/protocol.md (not the daemon's modules), so it checks the document as
much as the daemon.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import zmq

from edge.config import load_config
from edge.daemon import Daemon
from edge.inference.manifest import default_engines_dir
from edge.types import InferenceResult
from tests.conftest import wait_until


@pytest.fixture(scope="module")
def daemon(fixture_engines: Path) -> Iterator[Daemon]:
    env = {
        "MEDGE_ENGINES_DIR": str(fixture_engines),
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__DEFAULT_MODEL": "tiny-seg",
        "MEDGE_METRICS__PORT": "0",
        "MEDGE_DICOM__ENABLED": "false",
    }
    with Daemon(load_config(None, env=env)) as d:
        assert d.ready
        yield d


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _dealer(ctx: zmq.Context, daemon: Daemon) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(daemon.zmq.ingest_endpoint)
    return s


def _frame(rng: np.random.Generator, i: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Alternating uint8 480x640 and uint16 512x512 frames, dark noise plus one bright rectangle."""
    if i % 2 == 0:
        h, w, dtype, hi = 480, 640, np.uint8, 220
    else:
        h, w, dtype, hi = 512, 512, np.uint16, 4000
    img = rng.integers(0, hi // 8, size=(h, w)).astype(dtype)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    y1, x1 = y0 + int(rng.integers(h // 8, h // 2)), x0 + int(rng.integers(w // 8, w // 2))
    img[y0:y1, x0:x1] = hi
    return img, (y0, x0, y1, x1)


def _request(i: Any, img: np.ndarray, **extra: Any) -> list[bytes]:
    hdr = {"v": 1, "id": i, "dtype": str(img.dtype), "shape": list(img.shape), **extra}
    return [json.dumps(hdr).encode("utf-8"), img.tobytes()]


def _failed(daemon: Daemon, code: str) -> float:
    return daemon.registry.get_sample_value("medge_requests_failed_total", {"source": "zmq", "code": code}) or 0.0


def test_thousand_mixed_frames_pipelined(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    rng = np.random.default_rng(1234)
    n, window = 1000, 4  # window <= stream_backlog: nothing is shed
    expected: dict[str, tuple[tuple[int, ...], tuple[int, int, int, int]]] = {}
    replies: dict[str, tuple[dict[str, Any], list[bytes]]] = {}
    sent = 0
    t0 = time.perf_counter()
    while len(replies) < n:
        while sent < n and sent - len(replies) < window:
            img, rect = _frame(rng, sent)
            fid = f"f-{sent}"
            expected[fid] = (img.shape, rect)
            sock.send_multipart(_request(fid, img, stream="probe-1", sent_ns=time.time_ns()))
            sent += 1
        frames = sock.recv_multipart()
        hdr = json.loads(frames[0])
        assert hdr["id"] not in replies, "duplicate reply"
        replies[hdr["id"]] = (hdr, frames[1:])
    elapsed = time.perf_counter() - t0
    assert set(replies) == set(expected)
    ious = []
    for fid, (hdr, rest) in replies.items():
        shape, (y0, x0, y1, x1) = expected[fid]
        assert hdr["v"] == 1 and hdr["status"] == "ok", hdr
        assert hdr["model"] == "tiny-seg" and hdr["task"] == "segmentation" and hdr["stream"] == "probe-1"
        assert hdr["mask"] == {"dtype": "uint8", "shape": list(shape)}
        assert len(rest) == 1 and len(rest[0]) == shape[0] * shape[1]
        mask = np.frombuffer(rest[0], np.uint8).reshape(shape)
        ref = np.zeros(shape, bool)
        ref[y0:y1, x0:x1] = True
        ious.append((mask.astype(bool) & ref).sum() / (mask.astype(bool) | ref).sum())
        assert set(hdr["timing_us"]) == {"queue", "preprocess", "infer", "postprocess", "total"}
        assert isinstance(hdr["sent_ns"], int)
    assert min(ious) > 0.85, f"worst mask IoU {min(ious):.3f}"
    assert elapsed < 60


def test_req_client(daemon: Daemon, ctx: zmq.Context) -> None:
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    req.connect(daemon.zmq.ingest_endpoint)
    for i in range(3):
        img = np.zeros((50, 60, 3), np.uint8)
        img[10:30, 20:50] = 255
        req.send_multipart(_request(i, img))
        frames = req.recv_multipart()
        hdr = json.loads(frames[0])
        assert hdr["id"] == i and hdr["status"] == "ok" and len(frames) == 2
        assert np.frombuffer(frames[1], np.uint8).reshape(50, 60)[20, 30] == 1
    req.send_multipart([b"{oops", b""])
    hdr = json.loads(req.recv_multipart()[0])
    assert hdr["status"] == "error" and hdr["error"]["code"] == "bad_header"


def test_detection_boxes_and_want(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    img = np.zeros((300, 400), np.float32)
    img[120:180, 170:230] = 1.0
    sock.send_multipart(_request("d", img, model="tiny-det"))
    frames = sock.recv_multipart()
    hdr = json.loads(frames[0])
    assert len(frames) == 1 and hdr["status"] == "ok" and hdr["task"] == "detection" and "mask" not in hdr
    box = hdr["boxes"][0]
    assert set(box) == {"label", "score", "x0", "y0", "x1", "y1"} and box["label"] == "nodule"
    assert 0 <= box["x0"] < 200 < box["x1"] <= 400 and 0 <= box["y0"] < 150 < box["y1"] <= 300
    sock.send_multipart(_request("w", img, model="tiny-seg", want=["boxes"]))
    frames = sock.recv_multipart()
    hdr = json.loads(frames[0])
    assert len(frames) == 1 and hdr["status"] == "ok" and "mask" not in hdr and hdr["boxes"] == []


def _subscriber(ctx: zmq.Context, daemon: Daemon, *topics: bytes) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 10_000)
    for t in topics:
        sub.setsockopt(zmq.SUBSCRIBE, t)
    sub.connect(daemon.zmq.publish_endpoint)
    return sub


def _joined(sock: zmq.Socket, stream: str, *subs: zmq.Socket, timeout_s: float = 10.0) -> None:
    """Beat the slow joiner without sleeping: send frames on ``stream`` until every SUB has received
    one, then read each SUB up to the last of them (each is left with nothing of ``stream`` queued)."""
    img = np.zeros((8, 8), np.uint8)
    seen = [False] * len(subs)
    deadline = time.monotonic() + timeout_s
    sent = 0
    while not all(seen):
        assert time.monotonic() < deadline, "a subscription never took effect"
        sock.send_multipart(_request(f"join-{sent}", img, stream=stream))
        sent += 1
        assert json.loads(sock.recv_multipart()[0])["status"] == "ok"
        for i, sub in enumerate(subs):
            seen[i] = seen[i] or bool(sub.poll(20))
    last = f"join-{sent - 1}"
    for sub in subs:
        while json.loads(sub.recv_multipart()[1])["id"] != last:
            pass


def test_every_reply_is_published(daemon: Daemon, ctx: zmq.Context) -> None:
    sub = _subscriber(ctx, daemon, b"cam-7\0")
    sock = _dealer(ctx, daemon)
    _joined(sock, "cam-7", sub)
    img = np.full((32, 32), 9, np.uint8)
    sock.send_multipart(_request("p1", img, stream="cam-7"))
    reply = sock.recv_multipart()
    sock.send_multipart([json.dumps({"v": 1, "id": "p2", "stream": "cam-7"}).encode()])
    err = sock.recv_multipart()
    got = [sub.recv_multipart(), sub.recv_multipart()]
    assert got[0][0] == b"cam-7\0" and got[0][1:] == reply and len(reply) == 2
    assert got[1][0] == b"cam-7\0" and got[1][1:] == err


def test_exact_topic_does_not_match_a_longer_stream_and_prefixes_still_do(daemon: Daemon, ctx: zmq.Context) -> None:
    """``probe-1\\0`` is exact; an old subscription to the bare name (a prefix) and to ``""`` still get
    everything they got before. PUB keeps order per subscriber, so when the exact subscriber's first
    message is probe-1's, probe-10's (published before it) was not delivered to it."""
    exact = _subscriber(ctx, daemon, b"probe-1\0")
    bare = _subscriber(ctx, daemon, b"probe-1")
    every = _subscriber(ctx, daemon, b"")
    sock = _dealer(ctx, daemon)
    _joined(sock, "probe-1", exact, bare, every)
    img = np.full((16, 16), 40, np.uint8)
    for rid, stream in (("ten", "probe-10"), ("one", "probe-1")):
        sock.send_multipart(_request(rid, img, stream=stream))
        assert json.loads(sock.recv_multipart()[0])["status"] == "ok"
    first = exact.recv_multipart()
    assert first[0] == b"probe-1\0" and json.loads(first[1])["id"] == "one"
    for sub in (bare, every):
        got = [sub.recv_multipart() for _ in range(2)]
        assert [(m[0], json.loads(m[1])["id"]) for m in got] == [(b"probe-10\0", "ten"), (b"probe-1\0", "one")]
        assert all(json.loads(m[1])["stream"] == m[0][:-1].decode() for m in got)


MALFORMED = [
    ("non-JSON header", [b"\xff\xfe not json", b"x"], "bad_header"),
    ("JSON but not an object", [b"[1, 2]", b"x"], "bad_header"),
    ("wrong version", _request("v2", np.zeros((4, 4), np.uint8), v=2), "bad_header"),
    ("missing dtype", [json.dumps({"v": 1, "id": "nd", "shape": [4, 4]}).encode(), b"\0" * 16], "bad_header"),
    ("missing pixels frame", [json.dumps({"v": 1, "id": "mp", "dtype": "uint8", "shape": [4, 4]}).encode()], "payload_size"),
    ("extra frame", _request("xf", np.zeros((4, 4), np.uint8)) + [b"more"], "payload_size"),
    ("wrong payload size", [json.dumps({"v": 1, "id": "ps", "dtype": "uint16", "shape": [4, 4]}).encode(), b"\0" * 16], "payload_size"),
    ("unknown dtype", [json.dumps({"v": 1, "id": "ud", "dtype": "complex64", "shape": [4, 4]}).encode(), b"\0" * 128], "bad_dtype"),
    ("NaN pixel", [json.dumps({"v": 1, "id": "nan", "dtype": "float32", "shape": [4, 4]}).encode(),
                   np.array([0.5] * 15 + [np.nan], "<f4").tobytes()], "bad_dtype"),
    ("infinite pixel", [json.dumps({"v": 1, "id": "inf", "dtype": "float32", "shape": [4, 4]}).encode(),
                        np.array([np.inf] + [0.5] * 15, "<f4").tobytes()], "bad_dtype"),
    ("unknown model", _request("um", np.zeros((4, 4), np.uint8), model="no-such-model"), "unknown_model"),
    ("3-D shape with C=2", [json.dumps({"v": 1, "id": "c2", "dtype": "uint8", "shape": [4, 4, 2]}).encode(), b"\0" * 32], "bad_shape"),
    ("huge shape", [json.dumps({"v": 1, "id": "hg", "dtype": "uint8", "shape": [100000, 100000]}).encode(), b"\0" * 16], "bad_shape"),
    ("negative shape", [json.dumps({"v": 1, "id": "ng", "dtype": "uint8", "shape": [-4, 4]}).encode(), b""], "bad_shape"),
    ("1-D shape", [json.dumps({"v": 1, "id": "1d", "dtype": "uint8", "shape": [16]}).encode(), b"\0" * 16], "bad_shape"),
    ("string stream", _request("st", np.zeros((4, 4), np.uint8), stream=5), "bad_header"),
    ("unknown want", _request("wf", np.zeros((4, 4), np.uint8), want=["foo"]), "bad_header"),
    ("want misspelt heatmaps", _request("wh", np.zeros((4, 4), np.uint8), want=["mask", "heatmaps"]), "bad_header"),
    ("unknown op", [json.dumps({"v": 1, "id": "op", "op": "list"}).encode()], "bad_header"),
    ("models op with pixels", [json.dumps({"v": 1, "id": "mo", "op": "models"}).encode(), b"\0" * 16], "payload_size"),
    ("oversized header", [json.dumps({"v": 1, "pad": "x" * 70000}).encode(), b""], "bad_header"),
]


@pytest.mark.parametrize(("what", "frames", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_message_gets_its_error_code(
    daemon: Daemon, ctx: zmq.Context, what: str, frames: list[bytes], code: str
) -> None:
    before = _failed(daemon, code)
    sock = _dealer(ctx, daemon)
    sock.send_multipart(frames)
    reply = sock.recv_multipart()
    hdr = json.loads(reply[0])
    assert len(reply) == 1 and hdr["v"] == 1 and hdr["status"] == "error"
    assert hdr["error"]["code"] == code, hdr
    assert hdr["error"]["message"]
    try:
        expected_id = json.loads(frames[0])["id"]
    except (ValueError, TypeError, KeyError):
        expected_id = None
    assert hdr["id"] == expected_id
    assert _failed(daemon, code) == before + 1
    # the daemon keeps serving
    sock.send_multipart(_request("after", np.zeros((8, 8), np.uint8)))
    assert json.loads(sock.recv_multipart()[0])["status"] == "ok"


# ------------------------------------------------------------------ protocol v1 additions
def test_models_request_lists_the_served_models(daemon: Daemon, ctx: zmq.Context) -> None:
    """``op: models`` (header only) lists every served model with its task, labels, version, input
    size and input semantics, from the daemon's own loaded models."""
    sock = _dealer(ctx, daemon)
    sock.send_multipart([json.dumps({"v": 1, "id": "cat", "op": "models", "sent_ns": "12"}).encode()])
    reply = sock.recv_multipart()
    hdr = json.loads(reply[0])
    assert len(reply) == 1 and hdr["status"] == "ok" and hdr["op"] == "models" and hdr["id"] == "cat"
    assert hdr["sent_ns"] == "12" and hdr["default_model"] == "tiny-seg"
    by_name = {m["name"]: m for m in hdr["models"]}
    assert sorted(by_name) == ["tiny-det", "tiny-seg"] and len(hdr["models"]) == 2
    seg, det = by_name["tiny-seg"], by_name["tiny-det"]
    assert (seg["task"], seg["labels"], seg["version"]) == ("segmentation", ["lesion"], "1")
    assert (det["task"], det["labels"]) == ("detection", ["nodule"])
    for m in (seg, det):
        assert m["input"]["size"] == [64, 64] and m["input"]["channels"] == 1
        assert m["input"]["normalize"] == "minmax" and m["input"]["per_frame"] is True
        assert m["input"]["full_scale"] is None and "minimum" in m["input"]["semantics"]
        assert m["precision"] == "int8" and m["backend"] == "onnxruntime"  # precision = "auto" on a CPU
    assert seg["output"] == {"mask": True, "boxes": False, "probability": True, "classes": False, "heatmap": False,
                             "threshold": 0.5, "temperature": None, "max_detections": None, "nms_iou": None}
    assert det["output"]["boxes"] is True and det["output"]["max_detections"] >= 1


def test_models_request_is_a_reply_only_and_works_through_req(daemon: Daemon, ctx: zmq.Context) -> None:
    """Not published: the next thing a catch-all subscriber sees is the following frame's result."""
    every = _subscriber(ctx, daemon, b"")
    sock = _dealer(ctx, daemon)
    _joined(sock, "models-pub", every)
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    req.connect(daemon.zmq.ingest_endpoint)
    req.send(json.dumps({"v": 1, "op": "models"}).encode())
    via_req = req.recv_multipart()
    assert len(via_req) == 1 and json.loads(via_req[0])["id"] is None and json.loads(via_req[0])["op"] == "models"
    sock.send_multipart(_request("after-models", np.zeros((8, 8), np.uint8), stream="models-pub"))
    assert json.loads(sock.recv_multipart()[0])["status"] == "ok"
    assert json.loads(every.recv_multipart()[1])["id"] == "after-models"


@pytest.mark.parametrize(
    "extra, frames",
    [({}, [b"\x00" * 16]), ({"sent_ns": "x"}, []), ({"v": 2}, [])],
    ids=["with-pixels", "bad-sent-ns", "bad-version"],
)
def test_a_malformed_models_request_is_answered_but_not_published(
    daemon: Daemon, ctx: zmq.Context, extra: dict, frames: list
) -> None:
    """Its error reply goes to the requester only, like a models reply (it once went to the default stream's subscribers)."""
    every = _subscriber(ctx, daemon, b"")
    sock = _dealer(ctx, daemon)
    _joined(sock, "default", every)
    sock.send_multipart([json.dumps({"v": 1, "op": "models", "id": "bad-models", **extra}).encode(), *frames])
    hdr = json.loads(sock.recv_multipart()[0])
    assert hdr["status"] == "error" and hdr["id"] == "bad-models", hdr
    sock.send_multipart(_request("after-bad-models", np.zeros((4, 4), np.uint8)))
    assert json.loads(sock.recv_multipart()[0])["status"] == "ok"
    assert json.loads(every.recv_multipart()[1])["id"] == "after-bad-models"


def test_model_null_is_the_default_model_and_other_non_strings_are_bad_header(daemon: Daemon, ctx: zmq.Context) -> None:
    """As documented (``model``: a string, or ``null`` for the default), like ``op``."""
    sock = _dealer(ctx, daemon)
    sock.send_multipart(_request("null-model", np.zeros((4, 4), np.uint8), model=None))
    hdr = json.loads(sock.recv_multipart()[0])
    assert hdr["status"] == "ok" and hdr["model"] == daemon.zmq._default_model, hdr
    for bad in (1, True, ["m"], {"m": 1}):
        sock.send_multipart(_request("bad-model", np.zeros((4, 4), np.uint8), model=bad))
        assert json.loads(sock.recv_multipart()[0])["error"]["code"] == "bad_header"


def test_models_request_in_process_with_bundled_manifests(fixture_engines: Path, ctx: zmq.Context) -> None:
    """The ZmqServer describes the catalog it is given (here the bundled manifests, without loading
    them): us-lesion-seg reads values on a fixed 0..255 scale, xray-nodule-det per frame."""
    from edge.inference.manifest import Manifest

    names = [n for n in BUNDLED if (default_engines_dir() / n / "manifest.json").is_file()]
    manifests = [Manifest.load(default_engines_dir() / n) for n in names] or [Manifest.load(fixture_engines / "tiny-seg")]
    service = _Immediate(InferenceResult(status="ok", model="m"))
    srv = _server(service, catalog=manifests).start()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(srv.ingest_endpoint)
        sock.send_multipart([json.dumps({"v": 1, "id": 5, "op": "models"}).encode()])
        hdr = _strict(sock.recv_multipart()[0])
    finally:
        srv.close(timeout_s=1.0)
        service.close()
    assert [m["name"] for m in hdr["models"]] == [m.name for m in manifests] and hdr["id"] == 5
    assert hdr["default_model"] is None  # the fake service names no default
    by_name = {m["name"]: m for m in hdr["models"]}
    if "us-lesion-seg" in by_name:
        us = by_name["us-lesion-seg"]["input"]
        assert us["full_scale"] == [0, 255] and us["bits"] == 8 and us["expected_dtypes"] == ["uint8"]
        assert us["per_frame"] is False and "(x - 0) / 255" in us["semantics"]
    if "xray-nodule-det" in by_name:
        xr = by_name["xray-nodule-det"]
        assert xr["input"]["per_frame"] is True and xr["input"]["full_scale"] is None
        assert xr["input"]["expected_dtypes"] == ["uint8", "uint16", "int16", "float32"]
        assert xr["output"]["threshold"] == 0.275 and xr["output"]["nms_iou"] == 0.3


BIG_NS = "9007199254740993"  # 2**53 + 1: a JavaScript number cannot hold it


@pytest.mark.parametrize("sent_ns", [BIG_NS, "0", "-5", "00042", "1" * 20, 1732350000000000123, 0, -1])
def test_sent_ns_is_echoed_exactly_as_given(daemon: Daemon, ctx: zmq.Context, sent_ns: Any) -> None:
    sock = _dealer(ctx, daemon)
    sock.send_multipart(_request("ns", np.zeros((8, 8), np.uint8), sent_ns=sent_ns))
    hdr = json.loads(sock.recv_multipart()[0])
    assert hdr["status"] == "ok" and hdr["sent_ns"] == sent_ns and type(hdr["sent_ns"]) is type(sent_ns)
    # an error reply echoes it too
    sock.send_multipart([json.dumps({"v": 1, "id": "ns-err", "sent_ns": sent_ns}).encode()])
    err = json.loads(sock.recv_multipart()[0])
    assert err["status"] == "error" and err["sent_ns"] == sent_ns and type(err["sent_ns"]) is type(sent_ns)


@pytest.mark.parametrize(
    "sent_ns", ["", "12a", "+5", " 5", "5 ", "1.5", "1e9", "1" * 21, "--1", "\u0661\u0662", 1.5, True, [1]]
)
def test_bad_sent_ns_is_bad_header_and_not_echoed(daemon: Daemon, ctx: zmq.Context, sent_ns: Any) -> None:
    before = _failed(daemon, "bad_header")
    sock = _dealer(ctx, daemon)
    sock.send_multipart(_request("bad-ns", np.zeros((4, 4), np.uint8), sent_ns=sent_ns))
    hdr = json.loads(sock.recv_multipart()[0])
    assert hdr["error"]["code"] == "bad_header" and "sent_ns" in hdr["error"]["message"]
    assert "sent_ns" not in hdr and hdr["id"] == "bad-ns"
    assert _failed(daemon, "bad_header") == before + 1


def test_want_empty_is_status_and_timing_only(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    img = np.zeros((32, 32), np.uint8)
    img[8:24, 8:24] = 200
    for model in ("tiny-seg", "tiny-det"):
        sock.send_multipart(_request("w0", img, model=model, want=[]))
        reply = sock.recv_multipart()
        hdr = json.loads(reply[0])
        assert len(reply) == 1 and hdr["status"] == "ok" and "mask" not in hdr and "boxes" not in hdr
        assert set(hdr["timing_us"]) == {"queue", "preprocess", "infer", "postprocess", "total"}
    sock.send_multipart(_request("w2", img, want=["mask", "mask"]))
    reply = sock.recv_multipart()
    assert json.loads(reply[0])["status"] == "ok" and len(reply) == 2


@pytest.mark.parametrize("stream", ["", "a\x00b", "tab\there", "del\x7f", "x" * 129, 5, None, ["probe-1"]])
def test_invalid_stream_is_bad_header_echoed_null_and_not_published(
    daemon: Daemon, ctx: zmq.Context, stream: Any
) -> None:
    """Never turned into the default stream: the reply says ``"stream": null`` and nothing is
    published (the catch-all subscriber's next message is the following valid frame's)."""
    every = _subscriber(ctx, daemon, b"")
    sock = _dealer(ctx, daemon)
    _joined(sock, "after-bad-stream", every)
    sock.send_multipart(_request("bad-stream", np.zeros((4, 4), np.uint8), stream=stream))
    hdr = json.loads(sock.recv_multipart()[0])
    assert hdr["error"]["code"] == "bad_header" and "stream" in hdr["error"]["message"], hdr
    assert hdr["stream"] is None and hdr["id"] == "bad-stream"
    sock.send_multipart(_request("good-stream", np.zeros((4, 4), np.uint8), stream="after-bad-stream"))
    assert json.loads(sock.recv_multipart()[0])["status"] == "ok"
    assert json.loads(every.recv_multipart()[1])["id"] == "good-stream"


def test_unicode_stream_topic_is_utf8_and_terminated(daemon: Daemon, ctx: zmq.Context) -> None:
    stream = "Sonde-\u00e9\u03b1-1"
    sub = _subscriber(ctx, daemon, stream.encode("utf-8") + b"\0")
    sock = _dealer(ctx, daemon)
    _joined(sock, stream, sub)
    sock.send_multipart(_request("uni", np.zeros((4, 4), np.uint8), stream=stream))
    assert json.loads(sock.recv_multipart()[0])["stream"] == stream
    topic, hdr, *_ = sub.recv_multipart()
    assert topic == stream.encode("utf-8") + b"\0" and json.loads(hdr)["id"] == "uni"


def test_a_client_written_from_the_protocol_page(daemon: Daemon, ctx: zmq.Context) -> None:
    """What docs/protocol.md promises, with raw pyzmq and nothing of the daemon's: list the models,
    pick one and its dtype from the reply, send frames with a string sent_ns above 2**53, and watch
    exactly one stream on PUB while a prefix-colliding stream is published too."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(daemon.zmq.ingest_endpoint)
    dealer.send(json.dumps({"v": 1, "id": "m", "op": "models"}).encode())
    assert dealer.poll(10_000), "no reply to the models request"
    catalog = json.loads(dealer.recv_multipart()[0])
    seg = next(m for m in catalog["models"] if m["task"] == "segmentation")
    dtype = seg["input"]["expected_dtypes"][0]
    assert dtype in ("uint8", "uint16", "int16", "float32") and seg["labels"]

    viewer = ctx.socket(zmq.SUB)
    viewer.setsockopt(zmq.SUBSCRIBE, b"us-1\0")  # the exact topic: name + NUL
    viewer.connect(daemon.zmq.publish_endpoint)

    img = np.zeros((40, 60), dtype)
    img[10:30, 20:50] = 200
    sent = 0
    while True:  # the slow joiner: keep sending until the viewer has seen one of our frames
        for stream in ("us-10", "us-1"):  # us-10 first: it must never reach the viewer
            hdr = {"v": 1, "id": f"{stream}/{sent}", "stream": stream, "model": seg["name"],
                   "dtype": dtype, "shape": list(img.shape), "sent_ns": BIG_NS}
            dealer.send_multipart([json.dumps(hdr).encode(), img.tobytes()])
            assert dealer.poll(10_000), "no reply within the deadline (see Timeouts)"
            frames = dealer.recv_multipart()
            reply = json.loads(frames[0])
            assert reply["status"] == "ok" and reply["sent_ns"] == BIG_NS and reply["stream"] == stream
            mask = np.frombuffer(frames[1], np.uint8).reshape(reply["mask"]["shape"])
            assert mask.shape == img.shape and set(np.unique(mask).tolist()) <= set(range(len(seg["labels"]) + 1))
        sent += 1
        if viewer.poll(20):
            break
        assert sent < 500, "the PUB subscription never took effect"
    ids = []
    while f"us-1/{sent - 1}" not in ids:
        assert viewer.poll(10_000), f"the viewer did not get every us-1 result after the first: {ids}"
        topic, header, *rest = viewer.recv_multipart()
        assert topic == b"us-1\0" and json.loads(header)["stream"] == "us-1"
        assert len(rest) == 1  # the mask; no REQ delimiter on PUB
        ids.append(json.loads(header)["id"])
    first = int(ids[0].split("/")[1])
    assert ids == [f"us-1/{i}" for i in range(first, sent)]


def test_empty_message_from_a_dealer(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    sock.send(b"")  # a lone empty frame: delimiter and nothing else
    reply = sock.recv_multipart()
    assert reply[0] == b"" and json.loads(reply[1])["error"]["code"] == "bad_header"


def test_metrics_reflect_traffic(daemon: Daemon) -> None:
    reg = daemon.registry
    assert (reg.get_sample_value("medge_frames_received_total", {"source": "zmq", "model": "tiny-seg"}) or 0) >= 1
    assert (reg.get_sample_value("medge_end_to_end_seconds_count", {"source": "zmq", "model": "tiny-seg"}) or 0) >= 1
    assert (reg.get_sample_value("medge_stage_seconds_count", {"model": "tiny-seg", "stage": "egress"}) or 0) >= 1
    info = {"model": "tiny-seg", "version": "1", "backend": "onnxruntime", "precision": "int8", "fallback": ""}
    assert reg.get_sample_value("medge_model_info", info) == 1


BUNDLED = ("us-lesion-seg", "xray-nodule-det")


@pytest.mark.skipif(
    not all((default_engines_dir() / n / "manifest.json").is_file() for n in BUNDLED),
    reason="the bundled engines are not built yet (trainer)",
)
def test_bundled_models_over_the_wire_match_in_process(ctx: zmq.Context) -> None:
    """Replies from the daemon equal what LoadedModel.run gives for the same pixels."""
    from edge.inference.model import load_model

    env = {
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_METRICS__PORT": "0",
        "MEDGE_DICOM__ENABLED": "false",
        "MEDGE_SCHEDULER__MAX_BATCH": "1",
    }
    rng = np.random.default_rng(99)
    frames = [_frame(rng, i)[0] for i in range(40)]
    with Daemon(load_config(None, env=env)) as d:
        sock = _dealer(ctx, d)
        for name in BUNDLED:
            with load_model(name, precision="auto") as local:  # what the daemon serves by default
                for i, img in enumerate(frames):
                    sock.send_multipart(_request(i, img, model=name, stream=name))
                    reply = sock.recv_multipart()
                    hdr = json.loads(reply[0])
                    [ref] = local.run([img])
                    assert hdr["status"] == "ok" and hdr["id"] == i and hdr["model"] == name
                    if ref.mask is not None:
                        mask = np.frombuffer(reply[1], np.uint8).reshape(img.shape)
                        assert (mask == ref.mask).mean() > 0.999
                    else:
                        assert len(reply) == 1
                        assert [b["label"] for b in hdr["boxes"]] == [b.label for b in ref.boxes]
                        for got, exp in zip(hdr["boxes"], ref.boxes):
                            assert abs(got["x0"] - exp.x0) < 0.5 and abs(got["y1"] - exp.y1) < 0.5


def test_ingest_never_waits_on_inference(fixture_engines: Path, ctx: zmq.Context) -> None:
    """While a slow batch runs, the I/O thread keeps receiving, answering errors and shedding."""
    from prometheus_client import CollectorRegistry

    from edge.config import SchedulerConfig, ZmqConfig
    from edge.inference.manifest import Manifest
    from edge.inference.model import LoadedModel, ModelRegistry
    from edge.ingest.zmq import ZmqServer
    from edge.ops.metrics import Metrics
    from edge.scheduler import Scheduler

    entered = threading.Event()

    class Slow:
        name, precision, max_batch = "slow", "fp32", 1

        def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            entered.set()
            time.sleep(0.5)  # the slow model under test; releases the GIL, like ONNX Runtime
            return {"logits": np.zeros((batch.shape[0], 1, 64, 64), np.float32)}

        def close(self) -> None:
            pass

    models = ModelRegistry({"tiny-seg": LoadedModel(Manifest.load(fixture_engines / "tiny-seg"), Slow())})
    metrics = Metrics(CollectorRegistry(), process=False)
    cfg = ZmqConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*")
    with Scheduler(models, SchedulerConfig(max_batch=1, stream_backlog=1), metrics) as sched:
        with ZmqServer(cfg, sched, metrics) as srv:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVTIMEO, 10_000)
            sock.connect(srv.ingest_endpoint)
            img = np.zeros((64, 64), np.uint8)
            t0 = time.perf_counter()
            sock.send_multipart(_request("slow-1", img))  # occupies the worker for 0.5 s
            assert entered.wait(10)
            sock.send_multipart(_request("slow-2", img))  # waits
            sock.send_multipart(_request("slow-3", img))  # sheds slow-2 (backlog 1)
            sock.send_multipart([b"not json"])
            order = []
            for _ in range(4):
                hdr = json.loads(sock.recv_multipart()[0])
                order.append((hdr["id"], hdr["status"], time.perf_counter() - t0))
            sched.stop_accepting()
    first_two = {(i, s) for i, s, _ in order[:2]}
    assert first_two == {(None, "error"), ("slow-2", "dropped")}
    assert all(t < 0.4 for _, _, t in order[:2]), order  # answered while the slow batch ran
    assert [(i, s) for i, s, _ in order[2:]] == [("slow-1", "ok"), ("slow-3", "ok")]


def test_concurrent_pipelining_clients_lose_no_reply(daemon: Daemon, ctx: zmq.Context) -> None:
    """Six clients pipeline at once while workers send replies on the shared ROUTER and the I/O
    thread waits on its edge-triggered FD: every request is answered, in order per client, and
    no client stalls. (The lost-wake-up window itself is too narrow to hit on purpose; this
    exercises the socket lock under contention.)"""
    import threading

    n_clients, per_client, window = 6, 60, 4
    got: dict[int, list[Any]] = {c: [] for c in range(n_clients)}
    errors: list[str] = []

    def client(c: int) -> None:
        sock = _dealer(ctx, daemon)
        sock.setsockopt(zmq.RCVTIMEO, 5_000)  # a lost wake-up shows as a stalled client
        img = np.full((32, 48), c * 10, np.uint8)
        sent = 0
        try:
            while len(got[c]) < per_client:
                while sent < per_client and sent - len(got[c]) < window:
                    sock.send_multipart(_request(f"{c}-{sent}", img, stream=f"client-{c}"))
                    sent += 1
                hdr = json.loads(sock.recv_multipart()[0])
                if hdr["status"] != "ok":
                    errors.append(f"{hdr['id']}: {hdr['status']}")
                got[c].append(hdr["id"])
        except zmq.Again:
            errors.append(f"client {c} stalled after {len(got[c])} replies")
        finally:
            sock.close(linger=0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for c in range(n_clients):
        assert sorted(got[c], key=lambda s: int(s.split("-")[1])) == [f"{c}-{i}" for i in range(per_client)]


# ------------------------------------------------------------------ hardening: strict headers, boundaries, bounds
def _strict(data: bytes) -> dict[str, Any]:
    """Strict UTF-8 JSON (no NaN/Infinity) or the test fails."""

    def no_constant(name: str) -> Any:
        raise AssertionError(f"the reply holds the non-JSON constant {name}")

    return json.loads(data.decode("utf-8"), parse_constant=no_constant)


def _valid(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "dtype": "uint8", "shape": [4, 4], **fields}


HOSTILE = [
    ("lone surrogate stream, v 2", b'{"v":2,"stream":"\\ud800"}', None),
    ("lone surrogate id of a valid frame", json.dumps(_valid(id="\ud800")).encode(), b"\0" * 16),
    ("lone surrogate stream of a valid frame", json.dumps(_valid(stream="\udc00")).encode(), b"\0" * 16),
    ("lone surrogate key", json.dumps(_valid(**{"\udfff": 1})).encode(), b"\0" * 16),
    ("NaN id", b'{"v":1,"id":NaN,"dtype":"uint8","shape":[4,4]}', b"\0" * 16),
    ("Infinity sent_ns", b'{"v":1,"sent_ns":Infinity,"dtype":"uint8","shape":[4,4]}', b"\0" * 16),
    ("float overflow", b'{"v":1,"id":1e999,"dtype":"uint8","shape":[4,4]}', b"\0" * 16),
    ("5000-digit integer", b'{"v":1,"id":' + b"7" * 5000 + b',"dtype":"uint8","shape":[4,4]}', b"\0" * 16),
    ("21-digit integer", b'{"v":1,"id":' + b"7" * 21 + b',"dtype":"uint8","shape":[4,4]}', b"\0" * 16),
    ("nested 2000 deep", b'{"v":1,"id":' + b"[" * 2000 + b"]" * 2000 + b',"dtype":"uint8","shape":[4,4]}', b"\0" * 16),
    ("v 1.0", b'{"v":1.0,"id":"f","dtype":"uint8","shape":[4,4]}', b"\0" * 16),
    ("v true", b'{"v":true,"id":"t","dtype":"uint8","shape":[4,4]}', b"\0" * 16),
]


@pytest.mark.parametrize(("what", "header", "pixels"), HOSTILE, ids=[h[0].replace(" ", "-") for h in HOSTILE])
def test_hostile_header_is_bad_header(
    daemon: Daemon, ctx: zmq.Context, what: str, header: bytes, pixels: bytes | None
) -> None:
    """Rejected at parse time with a valid JSON reply (id null when it could not be read), counted,
    and the daemon keeps serving."""
    before = _failed(daemon, "bad_header")
    sock = _dealer(ctx, daemon)
    sock.send_multipart([header] if pixels is None else [header, pixels])
    reply = _strict(sock.recv_multipart()[0])
    assert reply["status"] == "error" and reply["error"]["code"] == "bad_header", reply
    if what.startswith("v "):
        assert reply["id"] in ("f", "t") and "v" in reply["error"]["message"]
    else:
        assert reply["id"] is None
    assert _failed(daemon, "bad_header") == before + 1
    sock.send_multipart(_request("after", np.zeros((8, 8), np.uint8)))
    assert json.loads(sock.recv_multipart()[0])["status"] == "ok"


class _Immediate:
    """A fake InferenceService answering every frame at once from its own thread."""

    def __init__(self, result: InferenceResult) -> None:
        import queue
        import threading

        self.result = result
        self.jobs: "queue.Queue[Any]" = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def models(self) -> tuple[str, ...]:
        return ("m",)

    def submit(self, image: np.ndarray, *, callback: Any, **_: Any) -> None:
        self.jobs.put(callback)

    def _run(self) -> None:
        while True:
            cb = self.jobs.get()
            if cb is None:
                return
            cb(self.result)

    def close(self) -> None:
        self.jobs.put(None)


def _server(service: Any, registry: Any = None, catalog: Any = None, **zmq_fields: Any) -> Any:
    from prometheus_client import CollectorRegistry

    from edge.config import ZmqConfig
    from edge.ingest.zmq import ZmqServer
    from edge.ops.metrics import Metrics

    metrics = Metrics(registry or CollectorRegistry(), process=False)
    cfg = ZmqConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", **zmq_fields)
    return ZmqServer(cfg, service, metrics, catalog=catalog)


def _wait_for(cond: Any, timeout_s: float = 10.0) -> None:
    wait_until(cond, timeout_s, interval_s=0.005)


def test_unencodable_result_gets_an_internal_reply_and_is_counted(ctx: zmq.Context) -> None:
    """A result whose reply cannot be encoded (a NaN score) is answered ``internal`` instead; it is
    counted as lost (reason encode) and failed, and the in-flight count returns to 0."""
    from prometheus_client import CollectorRegistry

    from edge.types import Box

    reg = CollectorRegistry()
    bad = InferenceResult(status="ok", model="m", boxes=[Box("lesion", float("nan"), 0.0, 0.0, 1.0, 1.0)])
    service = _Immediate(bad)
    srv = _server(service, reg).start()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(srv.ingest_endpoint)
        sock.send_multipart(_request("nan-score", np.zeros((4, 4), np.uint8)))
        reply = _strict(sock.recv_multipart()[0])
        assert reply["status"] == "error" and reply["error"]["code"] == "internal" and reply["id"] == "nan-score"
        _wait_for(lambda: srv._inflight == 0)
        assert reg.get_sample_value("medge_replies_lost_total", {"reason": "encode"}) == 1
        assert reg.get_sample_value("medge_requests_failed_total", {"source": "zmq", "code": "internal"}) == 1
        assert srv.healthy()
    finally:
        srv.close(timeout_s=1.0)
        service.close()


def test_io_loop_survives_an_unexpected_exception(ctx: zmq.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """The I/O loop's own error boundary: an exception outside message handling is logged once,
    counted in medge_internal_errors_total{component="zmq_io"}, and the loop keeps serving."""
    import threading

    import edge.ingest.zmq as ingest
    from prometheus_client import CollectorRegistry

    real = ingest._input_waiting
    raised: list[bool] = []

    def flaky(sock: zmq.Socket) -> bool:
        if threading.current_thread().name == "medge-zmq-io" and not raised:
            raised.append(True)
            raise RuntimeError("simulated I/O loop failure")
        return real(sock)

    monkeypatch.setattr(ingest, "_input_waiting", flaky)
    reg = CollectorRegistry()
    service = _Immediate(InferenceResult(status="ok", model="m"))
    srv = _server(service, reg).start()
    try:
        _wait_for(lambda: reg.get_sample_value("medge_internal_errors_total", {"component": "zmq_io"}) == 1)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(srv.ingest_endpoint)
        sock.send_multipart(_request("after-failure", np.zeros((4, 4), np.uint8)))
        assert json.loads(sock.recv_multipart()[0])["status"] == "ok"
        assert srv.healthy()
    finally:
        srv.close(timeout_s=1.0)
        service.close()


def test_failed_io_loop_is_unhealthy_and_close_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the loop gives up, healthy() says so and close() still returns promptly (no unbounded
    context termination)."""
    import threading

    import edge.ingest.zmq as ingest

    real = ingest._input_waiting

    def dead(sock: zmq.Socket) -> bool:
        if threading.current_thread().name == "medge-zmq-io":
            raise zmq.ContextTerminated()
        return real(sock)

    monkeypatch.setattr(ingest, "_input_waiting", dead)
    service = _Immediate(InferenceResult(status="ok", model="m"))
    srv = _server(service).start()
    _wait_for(lambda: not srv.healthy())
    t0 = time.monotonic()
    srv.close(timeout_s=1.0)
    assert time.monotonic() - t0 < 2.5
    service.close()


def test_sockets_are_bounded_before_anything_is_allocated() -> None:
    """ROUTER: MAXMSGSIZE from max_frame_bytes, hwm both ways, reply bytes; PUB: publish_hwm and a fixed SNDBUF."""
    from edge.egress.zmq import PUBLISH_SNDBUF_BYTES
    from edge.ingest.zmq_protocol import MAX_HEADER_BYTES

    service = _Immediate(InferenceResult(status="ok", model="m"))
    srv = _server(service, max_frame_bytes=1024, hwm=77, publish_hwm=5).start()
    try:
        with srv._lock:
            assert srv._router.getsockopt(zmq.MAXMSGSIZE) == MAX_HEADER_BYTES  # the header bound is larger
            assert srv._router.getsockopt(zmq.SNDHWM) == srv._router.getsockopt(zmq.RCVHWM) == 77
            assert srv._held.budget == srv._cfg.reply_buffer_mib << 20 == 256 << 20  # large replies: bytes
            assert srv._pub.socket.getsockopt(zmq.SNDHWM) == 5
            assert srv._pub.socket.getsockopt(zmq.SNDBUF) == PUBLISH_SNDBUF_BYTES
    finally:
        srv.close(timeout_s=1.0)
        service.close()


def test_a_stuck_io_loop_is_not_healthy_and_recovers(daemon: Daemon) -> None:
    # The I/O loop turns every 50 ms even when idle; held inside its lock it stops turning.
    srv = daemon.zmq
    assert srv is not None and srv.healthy(stall_s=5.0)
    with srv._lock:  # what a send stuck inside the loop looks like from outside
        wait_until(lambda: time.monotonic() - srv.last_turn > 0.3, 10.0, interval_s=0.01)
        assert not srv.healthy(stall_s=0.3)
        assert srv.healthy()  # without a stall bound only a dead thread is unhealthy
    wait_until(lambda: srv.healthy(stall_s=0.3), 10.0, interval_s=0.01)


def test_bare_publish_topic_keeps_the_old_framing_and_counts_what_is_published(
    fixture_engines: Path, ctx: zmq.Context
) -> None:
    cfg = load_config(
        None,
        env={
            "MEDGE_ENGINES_DIR": str(fixture_engines),
            "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
            "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
            "MEDGE_ZMQ__PUBLISH_TOPIC": "bare",
            "MEDGE_ZMQ__DEFAULT_MODEL": "tiny-seg",
            "MEDGE_METRICS__ENABLED": "false",
            "MEDGE_DICOM__ENABLED": "false",
        },
    )
    with Daemon(cfg).start() as d:
        assert d.zmq is not None
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVTIMEO, 10_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"cam-9")
        sub.connect(d.zmq.publish_endpoint)
        sock = _dealer(ctx, d)
        before = d.registry.get_sample_value("medge_published_total") or 0.0
        _joined(sock, "cam-9", sub)
        sock.send_multipart(_request("after-join", np.zeros((8, 8), np.uint8), stream="cam-9"))
        assert json.loads(sock.recv_multipart()[0])["status"] == "ok"
        frames = sub.recv_multipart()
        assert frames[0] == b"cam-9"  # the name alone, no NUL
        assert json.loads(frames[1])["stream"] == "cam-9"
        assert (d.registry.get_sample_value("medge_published_total") or 0.0) > before
        assert d.registry.get_sample_value("medge_publish_dropped_total", {"reason": "error"}) == 0.0
        sub.close(linger=0)
        sock.close(linger=0)


def test_models_request_checks_sent_ns_like_a_frame_request(daemon: Daemon, ctx: zmq.Context) -> None:
    sock = _dealer(ctx, daemon)
    sock.send_multipart([json.dumps({"v": 1, "op": "models", "id": "m1", "sent_ns": "1" * 21}).encode()])
    bad = json.loads(sock.recv_multipart()[0])
    assert bad["status"] == "error" and bad["error"]["code"] == "bad_header" and bad["id"] == "m1"
    sock.send_multipart([json.dumps({"v": 1, "op": "models", "id": "m2", "sent_ns": "9007199254740993"}).encode()])
    ok = json.loads(sock.recv_multipart()[0])
    assert ok["status"] == "ok" and ok["sent_ns"] == "9007199254740993"
