"""Load generator for the ZeroMQ protocol: paced or closed-loop, several streams.

One thread drives every stream (one DEALER socket each) with a poller, so
the client adds little jitter of its own and needs no locks:

- **rate** mode (open loop, like a probe): each stream sends ``rate_fps``
  frames per second on a fixed clock; if ``window`` requests of that stream
  are already in flight when a frame is due, the frame is *skipped* (counted,
  never sent), as a scanner that cannot wait would do.
- **concurrency** mode (closed loop, like perf_analyzer): each stream keeps
  ``concurrency`` requests outstanding.

Failure handling: a request with no reply after ``reply_timeout_s`` is
recorded as a ``timeout``; when nothing at all comes back for
``reply_timeout_s`` while requests are outstanding (or nothing can be sent
because no daemon is connected), the run stops early with ``aborted`` set
and keeps the samples it has. A daemon that is down at the start is found
within ``connect_timeout_s``.

Examples
--------
>>> import numpy as np
>>> src = ArraySource([np.zeros((4, 4), np.uint8)])
>>> spec = StreamSpec(name="s", source=src, rate_fps=10.0)
>>> spec.mode
'rate'
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import zmq

from edge.errors import DataError, ProtocolError
from edge.ops.curve import CurveClientKeys
from edge.tools.results import summarize_ms
from edge.tools.zmq_client import NotConnectedError, Reply, ZmqClient

__all__ = [
    "FrameSource",
    "ArraySource",
    "frames_from_path",
    "StreamSpec",
    "Sample",
    "Tick",
    "LoadResult",
    "run_load",
    "describe",
]

_log = logging.getLogger(__name__)


class FrameSource(Protocol):
    """Anything that returns frame ``i`` (sources loop)."""

    def frame(self, i: int) -> np.ndarray: ...


@dataclass
class ArraySource:
    """Frames from a list of arrays, looped."""

    arrays: Sequence[np.ndarray]

    def __post_init__(self) -> None:
        if not self.arrays:
            raise DataError("The frame source is empty.")

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i % len``."""
        return self.arrays[i % len(self.arrays)]


def _send_dtype(a: np.ndarray) -> np.ndarray:
    """Make an array sendable: supported dtype, integral floats as uint16 when they fit."""
    if a.dtype in (np.uint8, np.uint16, np.int16, np.float32):
        return np.ascontiguousarray(a)
    if a.dtype.kind == "f":
        if np.all(np.mod(a, 1) == 0) and a.min() >= 0 and a.max() <= 65535:
            return a.astype(np.uint16)
        if np.all(np.mod(a, 1) == 0) and a.min() >= -32768 and a.max() <= 32767:
            return a.astype(np.int16)
        return a.astype(np.float32)
    if a.dtype.kind in "iu":
        if a.min() >= 0 and a.max() <= 255:
            return a.astype(np.uint8)
        if a.min() >= 0 and a.max() <= 65535:
            return a.astype(np.uint16)
        return a.astype(np.float32)
    if a.dtype == bool:
        return a.astype(np.uint8)
    raise DataError(f"Pixel dtype {a.dtype} cannot be sent.")


def _load_dicom(path: Path) -> list[np.ndarray]:
    import pydicom

    from edge.ingest.dicom.pixels import iter_frames

    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise DataError(f"{path} is not a readable DICOM file: {exc}.") from exc
    return [_send_dtype(a) for _, a in iter_frames(ds)]


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im, dtype=np.uint16)
            if im.mode in ("I", "F"):
                return _send_dtype(np.asarray(im))
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if "A" in im.mode or im.mode == "P" else "L")
            return np.ascontiguousarray(np.asarray(im))
    except OSError as exc:
        raise DataError(f"{path} is not a readable image: {exc}.") from exc


def frames_from_path(path: Path | str, limit: int = 2000) -> ArraySource:
    """Frames from a folder of PNG/JPEG/DICOM files, or from one (multi-frame) DICOM file.

    Files in a folder are read in name order; DICOM files are recognised by
    the ``.dcm`` suffix or the ``DICM`` preamble. At most ``limit`` frames are
    kept in memory.
    """
    p = Path(path)
    frames: list[np.ndarray] = []
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    else:
        raise DataError(f"Frame source {p} is neither a file nor a folder.")
    for f in files:
        if len(frames) >= limit:
            break
        is_dicom = f.suffix.lower() in (".dcm", ".dicom")
        if not is_dicom:
            with open(f, "rb") as fh:
                head = fh.read(132)
            is_dicom = head[128:132] == b"DICM"
        if is_dicom:
            frames.extend(_load_dicom(f))
        elif f.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm"):
            frames.append(_load_image(f))
    if not frames:
        raise DataError(f"No images (PNG, JPEG, TIFF, DICOM) found in {p}.")
    return ArraySource(frames[:limit])


@dataclass
class StreamSpec:
    """One client stream: its source, model and pacing.

    Exactly one of ``rate_fps`` (open loop) and ``concurrency`` (closed loop)
    is set. ``frames`` caps the number of frames sent by this stream.
    """

    name: str
    source: FrameSource
    model: str | None = None
    rate_fps: float | None = None
    concurrency: int | None = None
    window: int = 8
    frames: int | None = None
    want: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if (self.rate_fps is None) == (self.concurrency is None):
            raise ValueError("Set exactly one of rate_fps and concurrency.")
        if self.rate_fps is not None and self.rate_fps <= 0:
            raise ValueError(f"rate_fps {self.rate_fps} is not > 0.")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency {self.concurrency} is not >= 1.")
        if self.window < 1:
            raise ValueError(f"window {self.window} is not >= 1.")

    @property
    def mode(self) -> str:
        """``rate`` or ``concurrency``."""
        return "rate" if self.rate_fps is not None else "concurrency"


@dataclass
class Sample:
    """One request's outcome (latency in microseconds, client-measured)."""

    stream: str
    seq: int
    t_send_s: float  # seconds since the run started
    latency_us: float | None  # None for timeouts
    status: str  # ok | dropped | error | timeout
    code: str | None = None
    timing_us: dict[str, int] = field(default_factory=dict)
    decision: bool | None = None  # a classification's decision (ok replies of classification models)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = {
            "stream": self.stream, "seq": self.seq, "t_send_s": round(self.t_send_s, 6),
            "latency_ms": None if self.latency_us is None else round(self.latency_us / 1000.0, 4),
            "status": self.status, "code": self.code, "timing_us": self.timing_us,
        }
        if self.decision is not None:
            d["decision"] = self.decision
        return d


@dataclass
class Tick:
    """Counts for one reporting interval (usually one second)."""

    t_s: float
    sent: int = 0
    ok: int = 0
    dropped: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class LoadResult:
    """Everything one run measured."""

    samples: list[Sample]
    ticks: list[Tick]
    sent: int
    skipped: int
    wall_s: float
    aborted: str | None = None
    last_replies: dict[str, Reply] = field(default_factory=dict)

    def latencies_ms(self, status: str = "ok", stream: str | None = None) -> np.ndarray:
        """Client latencies (ms) of the replies with ``status``."""
        return np.array(
            [s.latency_us / 1000.0 for s in self.samples
             if s.status == status and s.latency_us is not None and (stream is None or s.stream == stream)],
            dtype=np.float64,
        )

    def counts(self) -> dict[str, int]:
        """sent / ok / dropped / errors / timeouts / skipped / unanswered."""
        c = {"sent": self.sent, "ok": 0, "dropped": 0, "errors": 0, "timeouts": 0, "skipped": self.skipped}
        for s in self.samples:
            key = {"ok": "ok", "dropped": "dropped", "timeout": "timeouts"}.get(s.status, "errors")
            c[key] += 1
        c["unanswered"] = self.sent - (c["ok"] + c["dropped"] + c["errors"] + c["timeouts"])
        return c

    def stage_breakdown_ms(self) -> dict[str, dict[str, float | int]]:
        """Server-side stage timings (``timing_us``) of ok replies, summarised per stage."""
        stages: dict[str, list[float]] = {}
        for s in self.samples:
            if s.status == "ok":
                for k, v in s.timing_us.items():
                    if isinstance(v, (int, float)):
                        stages.setdefault(k, []).append(v / 1000.0)
        return {k: summarize_ms(v) for k, v in stages.items()}

    def summary(self) -> dict[str, Any]:
        """Counts, achieved rate and latency summary (ms) of ok replies."""
        c = self.counts()
        lat = self.latencies_ms()
        out: dict[str, Any] = dict(c)
        out["wall_s"] = round(self.wall_s, 3)
        out["achieved_fps"] = round(c["ok"] / self.wall_s, 2) if self.wall_s > 0 else 0.0
        out["latency_ms"] = summarize_ms(lat)
        out["server_stages_ms"] = self.stage_breakdown_ms()
        out["aborted"] = self.aborted
        codes: dict[str, int] = {}
        for s in self.samples:
            if s.status == "error":
                codes[s.code or "?"] = codes.get(s.code or "?", 0) + 1
        out["error_codes"] = codes
        decisions = [s.decision for s in self.samples if s.decision is not None]
        if decisions:  # a classification model: how many frames it called positive
            out["decisions"] = {"positive": sum(decisions), "negative": len(decisions) - sum(decisions)}
        return out


@dataclass
class _Stream:
    spec: StreamSpec
    client: ZmqClient
    interval_ns: int = 0
    next_ns: int = 0
    seq: int = 0
    in_flight: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (seq, t_send_ns)
    done: bool = False


class _Run:
    """The bookkeeping of one :func:`run_load` call (one thread, no locks)."""

    def __init__(self, endpoint: str, states: list[_Stream], *, duration_s: float | None,
                 reply_timeout_s: float, tick_s: float, on_tick: Callable[[Tick], None] | None,
                 keep_last: bool) -> None:
        self.endpoint = endpoint
        self.states = states
        self.reply_timeout_s = reply_timeout_s
        self.tick_s = tick_s
        self.on_tick = on_tick
        self.keep_last = keep_last
        self.samples: list[Sample] = []
        self.ticks: list[Tick] = []
        self.last: dict[str, Reply] = {}
        self.sent = self.skipped = 0
        self.aborted: str | None = None
        self.t0 = t0 = time.perf_counter_ns()
        n = len(states)
        for k, st in enumerate(states):
            if st.spec.rate_fps:
                st.interval_ns = int(1e9 / st.spec.rate_fps)
                st.next_ns = t0 + (st.interval_ns * k) // n  # spread streams over one interval
        self.stop_send_ns = t0 + int(duration_s * 1e9) if duration_s is not None else None
        self.timeout_ns = int(reply_timeout_s * 1e9)
        self.tick_ns = int(tick_s * 1e9)
        self.next_tick = t0 + self.tick_ns
        self.tick = Tick(t_s=0.0)
        self.tick_lat: list[float] = []
        self.last_progress = t0
        self.blocked_since: int | None = None  # first failed send since the last one that worked
        self.sending = True

    def outstanding(self) -> int:
        """Requests sent and not yet answered or timed out."""
        return sum(len(st.in_flight) for st in self.states)

    def update_sending(self, now: int) -> None:
        """Stop sending at the end of the duration or when every stream is done."""
        if self.sending and self.stop_send_ns is not None and now >= self.stop_send_ns:
            self.sending = False
        if self.sending and all(st.done for st in self.states):
            self.sending = False

    def _skip(self, st: _Stream, n: int) -> None:
        """Count ``n`` frames of ``st`` as skipped (never sent)."""
        self.skipped += n
        self.tick.skipped += n
        st.seq += n

    def send_due(self, now: int) -> tuple[int, bool]:
        """Send every frame that is due; return the clock after sending and whether a send was refused."""
        blocked = False
        for st in self.states:
            if not st.done:
                now, refused = self._send_stream(st, now)
                blocked = blocked or refused
        return now, blocked

    def _send_stream(self, st: _Stream, now: int) -> tuple[int, bool]:
        """Send what is due on one stream (paced or closed loop)."""
        sp = st.spec
        while True:
            if sp.frames is not None and st.seq >= sp.frames:
                st.done = True
                return now, False
            if sp.mode == "rate":
                if now < st.next_ns:
                    return now, False
                if now - st.next_ns > 1_000_000_000:  # stalled > 1 s: resync, count as skipped
                    missed = (now - st.next_ns) // st.interval_ns
                    self._skip(st, int(missed))
                    st.next_ns += missed * st.interval_ns
                    continue
                st.next_ns += st.interval_ns
                if len(st.in_flight) >= sp.window:
                    self._skip(st, 1)
                    continue
            elif len(st.in_flight) >= (sp.concurrency or 1):
                return now, False
            rid = f"{sp.name}:{st.seq}"
            try:
                t_send = st.client.send(sp.source.frame(st.seq), req_id=rid, model=sp.model,
                                        stream=sp.name, want=sp.want)
            except NotConnectedError:
                if self.blocked_since is None:
                    self.blocked_since = now
                if sp.mode == "rate":
                    self._skip(st, 1)
                return now, True
            self.blocked_since = None
            st.in_flight[rid] = (st.seq, t_send)
            st.seq += 1
            self.sent += 1
            self.tick.sent += 1
            now = time.perf_counter_ns()

    def wait_ms(self, now: int, blocked: bool) -> int:
        """How long to poll: until the next tick, the next due frame or a free closed-loop slot."""
        wait_ns = self.next_tick - now
        if self.sending:
            for st in self.states:
                if st.done:
                    continue
                if st.spec.mode == "rate":
                    wait_ns = min(wait_ns, st.next_ns - now)
                elif len(st.in_flight) < (st.spec.concurrency or 1):
                    wait_ns = min(wait_ns, 1_000_000 if blocked else 0)
        return max(0, int(wait_ns // 1_000_000))

    def receive(self, poller: zmq.Poller, by_sock: dict[zmq.Socket, _Stream], wait_ms: int) -> None:
        """Wait up to ``wait_ms`` and take every reply that has arrived."""
        for sock, _ in poller.poll(wait_ms):
            st = by_sock[sock]
            while True:
                try:
                    rep = st.client.recv_nowait()
                except ProtocolError as exc:
                    _log.warning("Undecodable reply ignored: %s", exc)
                    continue
                if rep is None:
                    break
                self._finish(st, rep)

    def _finish(self, st: _Stream, rep: Reply) -> None:
        """Record one reply as a sample."""
        entry = st.in_flight.pop(rep.id, None)
        self.last_progress = rep.recv_ns
        if entry is None:
            _log.debug("Reply with unknown id %r ignored.", rep.id)
            return
        seq, t_send = entry
        lat_us = (rep.recv_ns - t_send) / 1000.0
        status = rep.status if rep.status in ("ok", "dropped", "error") else "error"
        code = rep.error_code if status != "ok" else None
        self.samples.append(Sample(st.spec.name, seq, (t_send - self.t0) / 1e9, lat_us, status, code,
                                   {k: v for k, v in rep.timing_us.items() if isinstance(v, (int, float))},
                                   rep.decision if status == "ok" else None))
        if status == "ok":
            self.tick.ok += 1
            self.tick_lat.append(lat_us / 1000.0)
            if self.keep_last:
                self.last[st.spec.name] = rep
        elif status == "dropped":
            self.tick.dropped += 1
        else:
            self.tick.errors += 1

    def _timeout_sample(self, st: _Stream, seq: int, t_send: int) -> None:
        self.samples.append(Sample(st.spec.name, seq, (t_send - self.t0) / 1e9, None, "timeout", "timeout"))

    def expire(self, now: int) -> bool:
        """Apply the "daemon gone" rule, then per-request timeouts; True when the run is aborted."""
        outstanding = self.outstanding()
        if (outstanding or self.blocked_since is not None) and now - self.last_progress > self.timeout_ns:
            self.aborted = (f"the daemon at {self.endpoint} stopped answering "
                            f"(no reply for {self.reply_timeout_s:g} s; {outstanding} requests unanswered)")
            for st in self.states:
                for seq, t_send in st.in_flight.values():
                    self._timeout_sample(st, seq, t_send)
                st.in_flight.clear()
            return True
        for st in self.states:
            for rid, (seq, t_send) in list(st.in_flight.items()):
                if now - t_send > self.timeout_ns:
                    del st.in_flight[rid]
                    self._timeout_sample(st, seq, t_send)
                    self.tick.timeouts += 1
        if not outstanding and self.blocked_since is None:
            self.last_progress = now
        return False

    def _emit_tick(self) -> None:
        """Close the current interval: percentiles, keep it, report it."""
        tick = self.tick
        if self.tick_lat:
            p50, p99 = np.percentile(self.tick_lat, [50, 99])
            tick.p50_ms, tick.p99_ms = round(float(p50), 3), round(float(p99), 3)
        self.ticks.append(tick)
        if self.on_tick is not None:
            self.on_tick(tick)

    def maybe_tick(self, now: int) -> None:
        """Start a new interval when the current one is over."""
        if now >= self.next_tick:
            self._emit_tick()
            self.next_tick += self.tick_ns
            self.tick = Tick(t_s=round((self.next_tick - self.t0) / 1e9 - self.tick_s, 3))
            self.tick_lat = []

    def result(self) -> LoadResult:
        """Close the last (partial) interval and return what was measured."""
        wall_s = (time.perf_counter_ns() - self.t0) / 1e9
        tick = self.tick
        if tick.sent or tick.ok or tick.errors or tick.dropped or tick.timeouts:
            self._emit_tick()
        return LoadResult(self.samples, self.ticks, self.sent, self.skipped, wall_s, self.aborted, self.last)


def run_load(
    endpoint: str,
    streams: Sequence[StreamSpec],
    *,
    duration_s: float | None = None,
    reply_timeout_s: float = 5.0,
    connect_timeout_s: float = 3.0,
    tick_s: float = 1.0,
    on_tick: Callable[[Tick], None] | None = None,
    keep_last: bool = True,
    context: zmq.Context | None = None,
    curve: CurveClientKeys | None = None,
) -> LoadResult:
    """Drive ``streams`` against the daemon at ``endpoint``; return what was measured.

    Parameters
    ----------
    duration_s : float, optional
        Stop sending after this many seconds (``None``: when every stream
        has sent its ``frames``). Outstanding replies are then awaited for
        up to ``reply_timeout_s``.
    on_tick : callable, optional
        Called every ``tick_s`` with that interval's :class:`Tick` (from this
        thread; keep it quick).
    keep_last : bool
        Keep the last ok reply of each stream (with its mask) in
        ``LoadResult.last_replies``.
    curve : CurveClientKeys, optional
        Connect with CURVE (a daemon with ``[zmq] curve_server_key``).
    """
    if duration_s is None and any(s.frames is None for s in streams):
        raise ValueError("Give duration_s or a frame count for every stream.")
    ctx = context or zmq.Context.instance()
    states: list[_Stream] = []
    try:
        for spec in streams:
            states.append(_Stream(spec, ZmqClient(endpoint, context=ctx, curve=curve)))
        # A daemon that is down is found here, before the clock starts.
        deadline = time.monotonic() + connect_timeout_s
        for st in states:
            if not st.client.wait_connected(max(0.0, deadline - time.monotonic())):
                return LoadResult([], [], 0, 0, 0.0,
                                  aborted=f"no daemon is accepting connections at {endpoint} "
                                          f"(waited {connect_timeout_s:g} s)")
        poller = zmq.Poller()
        by_sock: dict[zmq.Socket, _Stream] = {}
        for st in states:
            poller.register(st.client.socket, zmq.POLLIN)
            by_sock[st.client.socket] = st
        run = _Run(endpoint, states, duration_s=duration_s, reply_timeout_s=reply_timeout_s,
                   tick_s=tick_s, on_tick=on_tick, keep_last=keep_last)
        while True:
            now = time.perf_counter_ns()
            run.update_sending(now)
            blocked = False
            if run.sending:
                now, blocked = run.send_due(now)
            if not run.sending and run.outstanding() == 0:
                break
            run.receive(poller, by_sock, run.wait_ms(now, blocked))
            now = time.perf_counter_ns()
            if run.expire(now):
                break
            run.maybe_tick(now)
        return run.result()
    finally:
        for st in states:
            st.client.close()


def describe(result: LoadResult) -> str:
    """One line: counts and latency of a run."""
    s = result.summary()
    lat = s["latency_ms"]
    if lat.get("count"):
        return (f"sent {s['sent']}, ok {s['ok']}, dropped {s['dropped']}, errors {s['errors']}, "
                f"timeouts {s['timeouts']}, skipped {s['skipped']}; latency p50 {lat['median_ms']:.2f} ms, "
                f"p99 {lat['p99_ms']:.2f} ms; {s['achieved_fps']:.1f} fps")
    return (f"sent {s['sent']}, ok 0, dropped {s['dropped']}, errors {s['errors']}, "
            f"timeouts {s['timeouts']}, skipped {s['skipped']}")
