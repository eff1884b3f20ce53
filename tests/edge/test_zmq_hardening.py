"""ZeroMQ hardening against a real ``medge serve`` child process (tiny fixture engines).

Each test starts its own daemon on ephemeral loopback ports (about 0.5 s)
with the configuration it needs, talks to it with plain pyzmq, reads its
counters from ``/metrics`` and its memory from ``/proc/<pid>/status``, and
stops it with SIGTERM. Memory is judged by ``VmHWM`` (the peak resident
set, which a short-lived allocation cannot hide from) against ``VmRSS``
before the test traffic: ``peak - before`` bounds whatever the traffic made
the daemon hold.

No fixed sleeps: replies, socket-monitor events and metrics are awaited
with deadlines. Together these tests take about 65 s on two cores, 60 s of
it the stuck-subscriber test.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from zmq.utils.monitor import recv_monitor_message

from edge.tools.daemon_process import DaemonProcess, free_port, write_demo_config

MiB = 1024 * 1024
SHUTDOWN_TIMEOUT_S = 4.0  # what write_demo_config writes


# ------------------------------------------------------------------ helpers
@contextmanager
def _daemon(tmp_path: Path, engines: Path, *, zmq_keys: dict[str, Any] | None = None,
            scheduler: dict[str, Any] | None = None) -> Iterator[SimpleNamespace]:
    """A ``medge serve`` child with extra ``[zmq]`` / ``[scheduler]`` keys; stopped (SIGTERM) on exit."""
    ports = {k: free_port() for k in ("ingest", "publish", "metrics", "dicom")}
    cfg = write_demo_config(tmp_path / "medge.toml", engines_dir=engines, spool_dir=tmp_path / "spool",
                            models=["tiny-seg", "tiny-det"], ports=ports, dicom=False, precision="fp32",
                            routes={}, results_port=None)
    text = cfg.read_text(encoding="utf-8")
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (zmq_keys or {}).items())
    text = text.replace("[zmq]\n", "[zmq]\n" + extra, 1)
    if scheduler:
        text += "\n[scheduler]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in scheduler.items())
    cfg.write_text(text, encoding="utf-8")
    log = tmp_path / "daemon.log"
    proc = DaemonProcess(cfg, ports["metrics"], log)
    try:
        proc.wait_ready(60.0)
        yield SimpleNamespace(
            endpoint=f"tcp://127.0.0.1:{ports['ingest']}",
            publish=f"tcp://127.0.0.1:{ports['publish']}",
            metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
            proc=proc,
            pid=proc.proc.pid,
            log=log,
        )
    finally:
        proc.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _dealer(ctx: zmq.Context, endpoint: str, timeout_ms: int = 10_000) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _request(rid: Any, img: np.ndarray, **extra: Any) -> list[Any]:
    hdr = {"v": 1, "id": rid, "dtype": str(img.dtype), "shape": list(img.shape), **extra}
    return [json.dumps(hdr).encode("utf-8"), img]


def _strict(data: bytes) -> dict[str, Any]:
    """Strict UTF-8 JSON (no NaN/Infinity) or the test fails."""

    def no_constant(name: str) -> Any:
        raise AssertionError(f"the reply holds the non-JSON constant {name}")

    return json.loads(data.decode("utf-8"), parse_constant=no_constant)


def _memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid``, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _metrics(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        text = resp.read().decode("utf-8")
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def _settled(url: str, timeout_s: float = 10.0) -> list[tuple[str, dict[str, str], float]]:
    """Metrics once every accepted frame is counted as ok, dropped or failed (polled, with a deadline).

    The end-to-end histogram is observed just after a reply leaves, so a scrape right after the
    last reply may be a moment early.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        s = _metrics(url)
        received = _total(s, "medge_frames_received_total", source="zmq")
        done = (_total(s, "medge_end_to_end_seconds_count", source="zmq") + _total(s, "medge_frames_dropped_total")
                + _total(s, "medge_requests_failed_total", source="zmq", code="internal"))
        if received == done or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def _assert_no_traceback(log: Path) -> None:
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in text, text[-3000:]


def _pipeline(socks: dict[str, zmq.Socket], frames: dict[str, list[list[Any]]], window: int,
              timeout_s: float = 60.0) -> dict[str, list[dict[str, Any]]]:
    """Send each socket's frames keeping ``window`` in flight; return every reply header, by socket."""
    poller = zmq.Poller()
    for s in socks.values():
        poller.register(s, zmq.POLLIN)
    sent = {k: 0 for k in socks}
    replies: dict[str, list[dict[str, Any]]] = {k: [] for k in socks}
    by_sock = {s: k for k, s in socks.items()}
    deadline = time.monotonic() + timeout_s
    while any(len(replies[k]) < len(frames[k]) for k in socks):
        for k, s in socks.items():
            while sent[k] < len(frames[k]) and sent[k] - len(replies[k]) < window:
                s.send_multipart(frames[k][sent[k]], copy=False)
                sent[k] += 1
        assert time.monotonic() < deadline, f"replies missing: {[(k, len(v)) for k, v in replies.items()]}"
        for s, _ in poller.poll(1000):
            replies[by_sock[s]].append(_strict(s.recv_multipart()[0]))
    return replies


# ------------------------------------------------------------------ (a) the 30-byte message
def test_surrogate_message_is_answered_and_shutdown_is_prompt(tmp_path: Path, fixture_engines: Path,
                                                              ctx: zmq.Context) -> None:
    """``{"v":2,"stream":"\\ud800"}`` used to kill the I/O loop (and hang SIGTERM): now it is
    ``bad_header``, a valid frame after it gets ``ok``, and SIGTERM exits within
    shutdown_timeout_s + 1 s."""
    with _daemon(tmp_path, fixture_engines) as d:
        sock = _dealer(ctx, d.endpoint, timeout_ms=5_000)
        sock.send(b'{"v":2,"stream":"\\ud800"}')
        reply = _strict(sock.recv_multipart()[0])
        assert reply["status"] == "error" and reply["error"]["code"] == "bad_header" and reply["id"] is None
        sock.send_multipart(_request("valid", np.zeros((16, 16), np.uint8)))
        assert _strict(sock.recv_multipart()[0])["status"] == "ok"
        t0 = time.monotonic()
        code = d.proc.stop(timeout_s=SHUTDOWN_TIMEOUT_S + 5)
        elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < SHUTDOWN_TIMEOUT_S + 1.0, elapsed
    _assert_no_traceback(d.log)


# ------------------------------------------------------------------ (b) surrogates in a valid frame
def test_surrogate_in_a_valid_frame_is_bad_header_and_counters_add_up(tmp_path: Path, fixture_engines: Path,
                                                                      ctx: zmq.Context) -> None:
    """A lone surrogate in id, stream or a key of an otherwise valid frame is ``bad_header`` (it used
    to be accepted and never answered, leaking the in-flight count); frames received ==
    ok + dropped + failed, and no reply is lost."""
    img = np.zeros((16, 16), np.uint8)
    hostile = [
        {"v": 1, "id": "\ud800", "dtype": "uint8", "shape": [16, 16]},
        {"v": 1, "id": "s", "stream": "\udfff", "dtype": "uint8", "shape": [16, 16]},
        {"v": 1, "id": "k", "\udc00": 1, "dtype": "uint8", "shape": [16, 16]},
    ]
    with _daemon(tmp_path, fixture_engines) as d:
        sock = _dealer(ctx, d.endpoint)
        statuses = []
        for i in range(10):
            sock.send_multipart(_request(f"ok-{i}", img, stream="probe-1"))
            statuses.append(_strict(sock.recv_multipart()[0]))
            if i % 3 == 0:
                sock.send_multipart([json.dumps(hostile[i // 3 % 3]).encode(), img])
                statuses.append(_strict(sock.recv_multipart()[0]))
        bad = [r for r in statuses if r["status"] == "error"]
        assert len(statuses) == 14 and len(bad) == 4
        assert all(r["error"]["code"] == "bad_header" and r["id"] is None for r in bad)
        assert sum(r["status"] == "ok" for r in statuses) == 10
        s = _settled(d.metrics_url)
        received = _total(s, "medge_frames_received_total", source="zmq")
        ok = _total(s, "medge_end_to_end_seconds_count", source="zmq")
        dropped = _total(s, "medge_frames_dropped_total")
        failed = _total(s, "medge_requests_failed_total", source="zmq")
        assert (received, ok, dropped, failed) == (10, 10, 0, 4)
        assert _total(s, "medge_requests_failed_total", source="zmq", code="bad_header") == 4
        lost = {lab["reason"]: v for n, lab, v in s if n == "medge_replies_lost_total"}
        assert set(lost) >= {"encode", "hwm", "disconnected", "closed", "internal"} and sum(lost.values()) == 0
    _assert_no_traceback(d.log)


# ------------------------------------------------------------------ (c) MAXMSGSIZE
def test_oversized_frame_disconnects_before_it_is_allocated(tmp_path: Path, fixture_engines: Path,
                                                            ctx: zmq.Context) -> None:
    """With max_frame_bytes = 1 MiB, four clients each sending a 32 MiB frame are disconnected by
    libzmq as the frame announces its size: the daemon's peak RSS does not grow by a frame (it grew
    by 118-127 MiB, all four frames, when each message was read whole and then answered
    ``payload_size``), and another client still gets ``ok``."""
    frame_bytes = 32 * MiB
    with _daemon(tmp_path, fixture_engines, zmq_keys={"max_frame_bytes": MiB}) as d:
        probe = _dealer(ctx, d.endpoint)
        for i in range(3):  # warm up the paths a small request takes
            probe.send_multipart(_request(i, np.zeros((64, 64), np.uint8)))
            assert _strict(probe.recv_multipart()[0])["status"] == "ok"
        before = _memory(d.pid)
        big = np.zeros((4096, frame_bytes // 8192), np.uint16)  # within max_pixels: only the bytes are too many
        senders, monitors = [], []
        for i in range(4):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            monitors.append(s.get_monitor_socket(zmq.EVENT_DISCONNECTED))
            s.connect(d.endpoint)
            s.send_multipart(_request(f"big-{i}", big), copy=False)
            senders.append(s)
        for mon in monitors:
            assert mon.poll(10_000), "the oversized sender was not disconnected"
            assert recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED
        probe.send_multipart(_request("after", np.zeros((64, 64), np.uint8)))
        assert _strict(probe.recv_multipart()[0])["status"] == "ok"
        after = _memory(d.pid)
        for s in senders:
            s.disable_monitor()
            s.close(linger=0)
        for mon in monitors:
            mon.close(linger=0)
        growth = after["VmHWM"] - before["VmRSS"]
        print(f"oversized frames: VmRSS before {before['VmRSS'] / MiB:.1f} MiB, "
              f"peak after {after['VmHWM'] / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB")
        assert growth < 8 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB for 4 refused {frame_bytes // MiB} MiB frames"
    _assert_no_traceback(d.log)


def test_message_of_many_frames_is_refused_without_keeping_them(tmp_path: Path, fixture_engines: Path,
                                                                ctx: zmq.Context) -> None:
    """A message of 300,000 empty frames (~0.6 MB on the wire) is answered ``payload_size`` naming its frame
    count, and the daemon keeps at most a handful of them: reading every frame into a list first cost ~250
    bytes of Python per frame (506 MiB for 2,000,000 measured), on top of what libzmq holds for the message."""
    n = 300_000
    with _daemon(tmp_path, fixture_engines) as d:
        sock = _dealer(ctx, d.endpoint, timeout_ms=30_000)
        sock.send_multipart(_request(0, np.zeros((64, 64), np.uint8)))
        assert _strict(sock.recv_multipart()[0])["status"] == "ok"
        before = _memory(d.pid)
        sock.send_multipart([b'{"v": 1, "id": 1}'] + [b""] * (n - 1))
        reply = _strict(sock.recv_multipart()[0])
        after = _memory(d.pid)
        assert reply["status"] == "error" and reply["error"]["code"] == "payload_size"
        assert f"{n} frames" in reply["error"]["message"]
        sock.send_multipart(_request(2, np.zeros((64, 64), np.uint8)))
        assert _strict(sock.recv_multipart()[0])["status"] == "ok"
        growth = after["VmHWM"] - before["VmRSS"]
        print(f"{n} frames: peak RSS growth {growth / MiB:.1f} MiB")
        assert growth < 48 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB for one message of {n} empty frames"
    _assert_no_traceback(d.log)


# ------------------------------------------------------------------ (d) queue byte bound
def test_queue_byte_bound_answers_overloaded_and_bounds_memory(tmp_path: Path, fixture_engines: Path,
                                                              ctx: zmq.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """queue_max_mb = 8: sixteen streams pipelining 1 MiB frames (4 in flight each, the stream
    backlog) get some ``overloaded`` replies, every frame is answered, and the daemon's peak RSS
    grows by less than 8 MiB (queue) + 32 MiB (the running frame's working set and frames in
    transit): 40 MiB. The frame-count bound alone let 16 x 4 frames = 64 MiB wait (peak growth
    73-79 MiB measured; 22-25 MiB with the byte bound).

    The daemon runs with glibc's mmap threshold fixed at 256 KiB, so a freed frame leaves the
    resident set at once and the peak measures live memory, not the allocator's cache.
    """
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    frame = np.zeros((1024, 1024), np.uint8)  # 1 MiB
    frame[256:768, 256:768] = 200
    n_streams, per_stream, window = 16, 10, 4
    queue_max_mb = 8
    with _daemon(tmp_path, fixture_engines, scheduler={"queue_max_mb": queue_max_mb, "max_batch": 1}) as d:
        warm = _dealer(ctx, d.endpoint)
        for i in range(3):
            warm.send_multipart(_request(i, frame))
            assert _strict(warm.recv_multipart()[0])["status"] == "ok"
        before = _memory(d.pid)
        socks = {f"probe-{i}": _dealer(ctx, d.endpoint) for i in range(n_streams)}
        frames = {k: [_request(f"{k}-{j}", frame, stream=k, want=["boxes"]) for j in range(per_stream)] for k in socks}
        replies = _pipeline(socks, frames, window)
        after = _memory(d.pid)
        flat = [r for rs in replies.values() for r in rs]
        assert len(flat) == n_streams * per_stream
        overloaded = sum(r["status"] == "error" and r["error"]["code"] == "overloaded" for r in flat)
        ok = sum(r["status"] == "ok" for r in flat)
        dropped = sum(r["status"] == "dropped" for r in flat)
        assert overloaded > 0 and ok > 0 and ok + dropped + overloaded == len(flat), (ok, dropped, overloaded)
        growth = after["VmHWM"] - before["VmRSS"]
        print(f"byte bound: ok {ok}, dropped {dropped}, overloaded {overloaded}; VmRSS before "
              f"{before['VmRSS'] / MiB:.1f} MiB, peak {after['VmHWM'] / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB")
        bound = (queue_max_mb + 32) * MiB
        assert growth < bound, f"peak RSS grew by {growth / MiB:.1f} MiB (bound {bound / MiB:.0f} MiB)"
        s = _settled(d.metrics_url)
        assert _total(s, "medge_requests_failed_total", source="zmq", code="overloaded") == overloaded
        assert _total(s, "medge_frames_received_total", source="zmq") == (
            _total(s, "medge_end_to_end_seconds_count", source="zmq") + _total(s, "medge_frames_dropped_total"))
    _assert_no_traceback(d.log)


# ------------------------------------------------------------------ (e) a subscriber that stops reading
def test_stuck_subscriber_does_not_grow_daemon_memory(tmp_path: Path, fixture_engines: Path,
                                                       ctx: zmq.Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SUB that stops reading for 60 s while a client streams 480x640 frames with masks at
    10 fps: the daemon holds at most ~publish_hwm (32) replies for it. Bound: 32 x 300 KiB masks
    (9.4 MiB) + 24 MiB allowance = 33.4 MiB (measured: 8.7 MiB held, 12.2 MiB peak growth). The
    old PUB high-water mark (the ROUTER's, 1000 messages) let all 600 replies of this test pile up
    (176 MiB held). ``MEDGE_STUCK_SUB_S`` shortens the 60 s for a quick local run."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))  # RSS tracks live memory (see (d))
    duration_s, fps = float(os.environ.get("MEDGE_STUCK_SUB_S", "60")), 10.0
    publish_hwm = 32
    img = np.zeros((480, 640), np.uint8)
    img[100:300, 200:500] = 220
    mask_bytes = img.size
    with _daemon(tmp_path, fixture_engines, zmq_keys={"publish_hwm": publish_hwm}) as d:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 1)  # hold (almost) nothing on the subscriber's side either:
        sub.setsockopt(zmq.RCVBUF, 64 * 1024)  # the backlog must build up in the daemon
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(d.publish)
        sock = _dealer(ctx, d.endpoint)
        # stream until the subscription has reached the daemon (the SUB sees a message), then stop reading
        deadline = time.monotonic() + 10
        i = 0
        while not sub.poll(0):
            assert time.monotonic() < deadline, "the subscription never took effect"
            sock.send_multipart(_request(f"warm-{i}", img, stream="probe-1"))
            assert _strict(sock.recv_multipart()[0])["status"] == "ok"
            i += 1
        before = _memory(d.pid)
        t0 = time.monotonic()
        n = int(duration_s * fps)
        for k in range(n):
            sock.send_multipart(_request(k, img, stream="probe-1"))
            reply = sock.recv_multipart()
            assert _strict(reply[0])["status"] == "ok" and len(reply) == 2  # the viewer never slows us
            wait_s = t0 + (k + 1) / fps - time.monotonic()
            if wait_s > 0:  # pacing at 10 fps, not synchronisation: nothing to wait for
                time.sleep(wait_s)
        after = _memory(d.pid)
        bound = publish_hwm * mask_bytes + 24 * MiB
        held = after["VmRSS"] - before["VmRSS"]
        peak = after["VmHWM"] - before["VmRSS"]
        print(f"stuck subscriber, {n} frames in {time.monotonic() - t0:.1f} s: VmRSS before "
              f"{before['VmRSS'] / MiB:.1f} MiB, after {after['VmRSS'] / MiB:.1f} MiB (held {held / MiB:.1f} MiB), "
              f"peak growth {peak / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB")
        assert peak < bound, f"daemon peak RSS grew by {peak / MiB:.1f} MiB (bound {bound / MiB:.1f} MiB)"
        sub.close(linger=0)
    _assert_no_traceback(d.log)


# ------------------------------------------------------------------ (f) hostile JSON
HOSTILE = [
    b'{"v":1,"id":' + b"[" * 2000 + b"]" * 2000 + b',"dtype":"uint8","shape":[4,4]}',
    b'{"v":1,"id":' + b"{\"a\":" * 2000 + b"1" + b"}" * 2000 + b',"dtype":"uint8","shape":[4,4]}',
    b'{"v":1,"id":' + b"9" * 5000 + b',"dtype":"uint8","shape":[4,4]}',
    b'{"v":1,"id":NaN,"dtype":"uint8","shape":[4,4]}',
    b'{"v":1,"id":"x","sent_ns":-Infinity,"dtype":"uint8","shape":[4,4]}',
    b'{"v":1,"id":1e400,"dtype":"uint8","shape":[4,4]}',
    b'{"v":1.0,"id":"float-v","dtype":"uint8","shape":[4,4]}',
    b'{"v":true,"id":"bool-v","dtype":"uint8","shape":[4,4]}',
]


def test_a_client_that_does_not_read_costs_the_reply_buffer_not_hwm_replies(
    tmp_path: Path, fixture_engines: Path, ctx: zmq.Context
) -> None:
    """A DEALER that sends 1024x1024 frames asking for mask and probability (2 MiB a reply) and reads nothing.

    With ``reply_buffer_mib = 4`` the daemon holds 2 such replies for it, not ``hwm`` (1000: 2 GiB);
    the rest are counted lost (``reason="hwm"``), beyond what the loopback's socket buffers take
    (4 MiB here). Before 2026-12-01 none was lost: ``hwm`` replies of two 4096x4096 maps (32 MiB each)
    could pile up per client. A client that reads, pipelining small replies, loses none
    (``test_zmq_fuzz``'s window of 16, ``test_thousand_mixed_frames_pipelined``).
    """
    n = 40
    img = np.zeros((1024, 1024), np.uint8)
    with _daemon(tmp_path, fixture_engines, zmq_keys={"reply_buffer_mib": 4, "max_pixels": 1024 * 1024},
                 scheduler={"stream_backlog": n, "queue_size": n, "queue_max_mb": 64}) as d:  # none shed
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 64 * 1024)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.endpoint)
        before = _memory(d.pid)
        for k in range(n):
            sock.send_multipart(_request(k, img, model="tiny-seg", want=["mask", "probability"]), copy=False)
        deadline = time.monotonic() + 120
        while True:  # every frame answered (its reply queued, or lost at the bound: counted in both)
            s = _metrics(d.metrics_url)
            ok = _total(s, "medge_end_to_end_seconds_count", source="zmq")
            lost = _total(s, "medge_replies_lost_total", reason="hwm")
            if ok >= n or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        grew = _memory(d.pid)["VmRSS"] - before["VmRSS"]
        assert ok == n and lost >= n - 6, (ok, lost)  # 2 held + at most ~4 in the socket buffers
        assert grew < 64 * MiB, f"RSS grew {grew / MiB:.0f} MiB"  # 40 held replies would be 80 MiB
        sock.close(linger=0)
    _assert_no_traceback(d.log)


def test_hostile_json_is_bad_header_without_a_traceback(tmp_path: Path, fixture_engines: Path,
                                                        ctx: zmq.Context) -> None:
    """Deep nesting, a 5000-digit integer, NaN/Infinity, an overflowing float, v 1.0 / true: each is
    ``bad_header`` with a strict JSON reply (it used to be ``internal`` with a traceback logged per
    message, or an invalid-JSON echo of NaN), and the daemon log has no traceback."""
    with _daemon(tmp_path, fixture_engines) as d:
        sock = _dealer(ctx, d.endpoint)
        for raw in HOSTILE * 3:
            sock.send_multipart([raw, b"\0" * 16])
            reply = _strict(sock.recv_multipart()[0])
            assert reply["status"] == "error" and reply["error"]["code"] == "bad_header", (raw[:40], reply)
            assert reply["id"] in (None, "x", "float-v", "bool-v")
        sock.send_multipart(_request("after", np.zeros((8, 8), np.uint8)))
        assert _strict(sock.recv_multipart()[0])["status"] == "ok"
        s = _metrics(d.metrics_url)
        assert _total(s, "medge_requests_failed_total", source="zmq", code="bad_header") == 3 * len(HOSTILE)
        assert _total(s, "medge_internal_errors_total") == 0
    _assert_no_traceback(d.log)


# ------------------------------------------------------------------ (g) the Python client's protocol v1 additions
def test_python_client_lists_models_subscribes_exactly_and_reconnects(tmp_path: Path, fixture_engines: Path) -> None:
    """``edge.tools.zmq_client`` against a ``medge serve`` child: ``models()`` lists both served models with
    their input semantics; a ``ZmqSubscriber`` of ``probe-1`` never gets ``probe-10``'s results (PUB
    keeps order per subscriber, and probe-10's frame is always published first); a string
    ``sent_ns`` above 2**53 comes back as that string; after ``reconnect()`` a reply owed to the old
    socket never reaches the new one."""
    from edge.tools.zmq_client import ZmqClient, ZmqSubscriber

    big_ns = str(2**53 + 1)
    img = np.zeros((32, 32), np.uint8)
    img[8:24, 8:24] = 200
    with _daemon(tmp_path, fixture_engines) as d:
        with ZmqClient(d.endpoint) as client, ZmqSubscriber(d.publish, streams=["probe-1"]) as sub:
            catalog = client.models(timeout_s=10).header
            assert catalog["op"] == "models" and catalog["default_model"] in ("tiny-seg", "tiny-det")
            by_name = {m["name"]: m for m in catalog["models"]}
            assert sorted(by_name) == ["tiny-det", "tiny-seg"]
            assert by_name["tiny-seg"]["task"] == "segmentation" and by_name["tiny-det"]["labels"] == ["nodule"]
            assert all(m["input"]["size"] == [64, 64] and m["input"]["per_frame"] for m in by_name.values())

            deadline, i = time.monotonic() + 10, 0
            while True:  # the slow joiner: stream until the subscriber has seen a result
                for stream in ("probe-10", "probe-1"):
                    assert client.request(img, req_id=f"{stream}/{i}", stream=stream).status == "ok"
                i += 1
                if sub.socket.poll(20):
                    break
                assert time.monotonic() < deadline, "the subscription never took effect"
            got = []
            while f"probe-1/{i - 1}" not in got:
                msg = sub.recv(timeout_s=10)
                assert msg is not None, f"the subscriber lost probe-1 results: {got}"
                assert msg.stream == "probe-1" and msg.reply.header["stream"] == "probe-1"
                assert msg.reply.mask is not None and msg.reply.mask.shape == img.shape
                got.append(msg.reply.id)

            client.send(img, req_id="ns", stream="probe-1", sent_ns=big_ns)
            reply = client.recv(timeout_s=10)
            assert reply is not None and reply.id == "ns" and reply.header["sent_ns"] == big_ns

            client.send(img, req_id="owed-to-the-old-socket")
            assert client.socket.poll(10_000), "no reply to the frame before the reconnect"
            client.reconnect()  # the waiting reply goes with the old socket
            assert client.wait_connected(10)
            client.send(img, req_id="after-reconnect")
            reply = client.recv(timeout_s=10)
            assert reply is not None and reply.id == "after-reconnect" and reply.status == "ok"
    _assert_no_traceback(d.log)
