"""``medge capture``'s work: frames from a video source to a model, replies counted, an overlay video written.

Frames come from :class:`edge.ingest.capture_frames.FrameStream` (the
daemon's own reader: device, file or URL; paced, cropped, converted). They
go through a transport:

* :class:`ZmqTransport`: a running daemon over protocol v1 (one DEALER,
  pipelined), the integrator's set-up (a capture box feeding an inference
  box, or a second process beside the daemon);
* :class:`LocalTransport`: the model loaded in this process behind the
  daemon's scheduler (no daemon needed), to try a source or a crop.

At most ``window`` frames are in flight; a frame captured while the window
is full waits as the *held* frame, and a newer one replaces it (newest
wins, the older counted as ``skipped``): the model always gets the latest
picture, and a slow model never builds a backlog. Latency is measured from
the send to the reply, while the next frame's pacing wait polls for
replies. With an :class:`OverlayWriter` every answered frame is written to
a video file with the mask outlined in red and boxes in green
(:mod:`edge.egress.dicom.outlines`); for a second monitor, write to a
v4l2loopback device's file or play the file (docs/operations.md).

Examples
--------
>>> stats = CaptureStats()
>>> stats.summary()["sent"]
0
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edge.config import MedgeConfig
from edge.egress.dicom.outlines import draw_boxes, mask_boundary
from edge.egress.zmq import encode_result
from edge.errors import MedgeError, ProtocolError
from edge.ingest.capture_frames import SKIP_REASONS, Captured, FrameStream, require_av
from edge.ops.curve import CurveClientKeys
from edge.tools.results import summarize_ms
from edge.tools.zmq_client import NotConnectedError, Reply, ZmqClient, decode_reply
from edge.types import InferenceResult

__all__ = ["CaptureStats", "LocalTransport", "OverlayWriter", "ZmqTransport", "run_capture"]

_log = logging.getLogger(__name__)

_WANT = ("mask", "boxes")
_POLL_S = 0.05


@dataclass
class CaptureStats:
    """What one ``medge capture`` run saw (counts, and send-to-reply latencies in ms).

    ``skipped``: captured frames replaced by a newer one while the window
    was full (newest wins); ``unused``: decoded frames the source did not
    deliver, by :data:`edge.ingest.capture_frames.SKIP_REASONS` (over
    ``max_pixels``, outside the crop, thinned to ``fps``).
    """

    captured: int = 0
    sent: int = 0
    ok: int = 0
    dropped: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0
    unused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    latencies_ms: list[float] = field(default_factory=list)
    error_codes: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        """Counts, achieved rates and the latency summary (:func:`edge.tools.results.summarize_ms`)."""
        elapsed = max(1e-9, time.monotonic() - self.started)
        return {
            "captured": self.captured,
            "sent": self.sent,
            "ok": self.ok,
            "dropped": self.dropped,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "skipped": self.skipped,
            "unused": dict(self.unused),
            "elapsed_s": round(elapsed, 3),
            "captured_fps": round(self.captured / elapsed, 2),
            "answered_fps": round(self.ok / elapsed, 2),
            "latency": summarize_ms(self.latencies_ms),
            "error_codes": dict(self.error_codes),
        }


class Transport(Protocol):
    """Where frames go: :meth:`send` one, :meth:`poll` for replies, :meth:`close`."""

    def send(self, image: np.ndarray, req_id: int) -> None: ...

    def poll(self, timeout_s: float) -> list[Reply]: ...

    def close(self) -> None: ...


class ZmqTransport:
    """A running daemon's ROUTER, over one DEALER (:class:`edge.tools.zmq_client.ZmqClient`).

    Raises
    ------
    NotConnectedError
        When no daemon accepts the connection within ``connect_timeout_s``.
    """

    def __init__(self, endpoint: str, *, model: str | None, stream: str, connect_timeout_s: float = 3.0,
                 curve: CurveClientKeys | None = None) -> None:
        self._client = ZmqClient(endpoint, curve=curve)
        self._model, self._stream = model, stream
        if not self._client.wait_connected(connect_timeout_s):
            self._client.close()
            raise NotConnectedError(f"No daemon is connected at {endpoint} after {connect_timeout_s:g} s.")

    def send(self, image: np.ndarray, req_id: int) -> None:
        self._client.send(image, req_id=req_id, model=self._model, stream=self._stream, want=list(_WANT))

    def poll(self, timeout_s: float) -> list[Reply]:
        first = self._client.recv(timeout_s)
        if first is None:
            return []
        out = [first]
        while (more := self._client.recv_nowait()) is not None:
            out.append(more)
        return out

    def close(self) -> None:
        self._client.close()


class LocalTransport:
    """One model loaded in this process behind the daemon's scheduler; replies encoded as the daemon's.

    Parameters
    ----------
    config : MedgeConfig
        Validated; ``model`` must be one of its models.
    model : str
    stream : str
    """

    def __init__(self, config: MedgeConfig, model: str, stream: str) -> None:
        from edge.inference.model import ModelRegistry
        from edge.scheduler import Scheduler

        one = dataclasses.replace(config, models=(config.model(model),))
        self._registry = ModelRegistry.from_config(one, warmup=True)
        self._scheduler = Scheduler(self._registry, one.scheduler, None, default_model=model,
                                    model_configs={model: one.model(model)}).start()
        self._model, self._stream = model, stream
        self._results: queue.SimpleQueue[tuple[int, InferenceResult, int]] = queue.SimpleQueue()

    def send(self, image: np.ndarray, req_id: int) -> None:
        def _done(res: InferenceResult) -> None:
            self._results.put((req_id, res, time.perf_counter_ns()))

        self._scheduler.submit(image, model=self._model, source="capture", stream=self._stream, callback=_done)

    def poll(self, timeout_s: float) -> list[Reply]:
        out: list[Reply] = []
        try:
            item = self._results.get(timeout=max(0.0, timeout_s)) if timeout_s > 0 else self._results.get_nowait()
            while True:
                req_id, res, at = item
                enc = encode_result(req_id, res, stream=self._stream)
                out.append(decode_reply([enc.header, *enc.payload], at))
                item = self._results.get_nowait()
        except queue.Empty:
            return out

    def close(self) -> None:
        self._scheduler.close(timeout_s=2.0)
        self._registry.close()


class OverlayWriter:
    """A video file of the answered frames: mask outlined in red, boxes in green (PyAV encode).

    H.264 (``libx264``) where PyAV's FFmpeg has it, else MPEG-4 Part 2;
    frames are padded to even sizes (4:2:0 needs them).
    """

    def __init__(self, path: Path, fps: float) -> None:
        av = require_av()
        self.path = Path(path)
        self._container = av.open(str(self.path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=max(1, round(fps)))
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self._stream.options = {"preset": "veryfast", "tune": "zerolatency"}
        self._size: tuple[int, int] | None = None
        self._av = av
        self.frames = 0

    @staticmethod
    def render(image: np.ndarray, reply: Reply | None) -> np.ndarray:
        """RGB uint8: ``image`` with the reply's mask outline and boxes drawn on it."""
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()
        if reply is not None and reply.status == "ok":
            if reply.mask is not None and reply.mask.shape == rgb.shape[:2]:
                rgb[mask_boundary(reply.mask > 0)] = (255, 0, 0)
            draw_boxes(rgb, reply.boxes, (0, 255, 0), width=2)
        return rgb

    def write(self, image: np.ndarray, reply: Reply | None) -> None:
        """Append one frame (the first fixes the video's size; others are padded or cut to it)."""
        rgb = self.render(image, reply)
        if self._size is None:
            h, w = rgb.shape[:2]
            self._size = (h + h % 2, w + w % 2)
            self._stream.height, self._stream.width = self._size
        h, w = self._size
        canvas = np.zeros((h, w, 3), np.uint8)
        ch, cw = min(h, rgb.shape[0]), min(w, rgb.shape[1])
        canvas[:ch, :cw] = rgb[:ch, :cw]
        frame = self._av.VideoFrame.from_ndarray(canvas, format="rgb24")
        frame.pts = self.frames
        self.frames += 1
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and close the file."""
        try:
            if self._size is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()


@dataclass
class _InFlight:
    sent_ns: int
    deadline: float
    image: np.ndarray | None


class _Run:
    """One run's state: in-flight frames, the held frame, statistics."""

    def __init__(self, transport: Transport, window: int, reply_timeout_s: float,
                 overlay: OverlayWriter | None) -> None:
        self.t, self.window, self.reply_timeout_s, self.overlay = transport, window, reply_timeout_s, overlay
        self.stats = CaptureStats()
        self.inflight: dict[str, _InFlight] = {}
        self.held: Captured | None = None

    def offer(self, item: Captured) -> None:
        """A captured frame: send it if the window allows, else hold it (replacing an older held one)."""
        self.stats.captured += 1
        if len(self.inflight) < self.window:
            self._send(item)
            return
        if self.held is not None:
            self.stats.skipped += 1
        self.held = item

    def _send(self, item: Captured) -> None:
        req_id = self.stats.sent
        self.stats.sent += 1
        try:
            self.t.send(item.image, req_id)
        except ProtocolError as exc:  # the local scheduler refused it (its queue is full): an error reply
            self.stats.errors += 1
            self.stats.error_codes[exc.code] += 1
            return
        keep = item.image if self.overlay is not None else None
        self.inflight[str(req_id)] = _InFlight(time.perf_counter_ns(), time.monotonic() + self.reply_timeout_s, keep)

    def pump(self, timeout_s: float) -> None:
        """Take the replies that arrive within ``timeout_s``, expire late frames, send the held one."""
        for rep in self.t.poll(timeout_s):
            sent = self.inflight.pop(rep.id, None)
            if sent is None:
                continue  # a late reply to a frame already counted as a timeout
            self._count(rep, sent)
        now = time.monotonic()
        for key in [k for k, v in self.inflight.items() if v.deadline < now]:
            del self.inflight[key]
            self.stats.timeouts += 1
        if self.held is not None and len(self.inflight) < self.window:
            held, self.held = self.held, None
            self._send(held)

    def _count(self, rep: Reply, sent: _InFlight) -> None:
        s = self.stats
        if rep.status == "ok":
            s.ok += 1
            s.latencies_ms.append((rep.recv_ns - sent.sent_ns) / 1e6)
        elif rep.status == "dropped":
            s.dropped += 1
        else:
            s.errors += 1
            s.error_codes[rep.error_code or "unknown"] += 1
        if self.overlay is not None and sent.image is not None:
            self.overlay.write(sent.image, rep)


def _wait_until_due(run: _Run, item: Captured, end: float | None) -> bool:
    """Take replies until ``item`` is due (True), or until ``end`` comes first (False)."""
    while (left := item.due - time.monotonic()) > 0:
        if end is not None and time.monotonic() >= end:
            return False
        run.pump(min(left, _POLL_S))
    run.pump(0.0)
    return True


def run_capture(
    frames: FrameStream,
    transport: Transport,
    *,
    window: int = 2,
    max_frames: int | None = None,
    duration_s: float | None = None,
    reply_timeout_s: float = 5.0,
    overlay: OverlayWriter | None = None,
    on_tick: Callable[[dict[str, Any]], None] | None = None,
) -> CaptureStats:
    """Capture until ``max_frames``, ``duration_s`` or the end of a file; then wait for the last replies.

    ``on_tick`` gets :meth:`CaptureStats.summary` once a second. ``duration_s``
    also ends a wait for a frame that is not yet due.

    Raises
    ------
    SourceUnavailable
        From ``frames`` (a source that cannot be opened or read).
    NotConnectedError
        When the daemon goes away (a send finds no connection).
    """
    if window < 1:
        raise MedgeError(f"The window {window} is not >= 1.")
    run = _Run(transport, window, reply_timeout_s, overlay)
    end = None if duration_s is None else time.monotonic() + duration_s
    next_tick = time.monotonic() + 1.0
    items = iter(frames)
    try:
        for item in items:
            if not _wait_until_due(run, item, end):
                break
            run.offer(item)
            now = time.monotonic()
            if on_tick is not None and now >= next_tick:
                on_tick(run.stats.summary())
                next_tick = now + 1.0
            if (max_frames is not None and run.stats.captured >= max_frames) or (end is not None and now >= end):
                break
    finally:
        frames.stop()
        items.close()  # closes the source now, not when the generator is collected
        run.stats.unused = {reason: frames.skipped.get(reason, 0) for reason in SKIP_REASONS}
    deadline = time.monotonic() + reply_timeout_s
    while (run.inflight or run.held is not None) and time.monotonic() < deadline:
        run.pump(_POLL_S)
    run.stats.timeouts += len(run.inflight)
    return run.stats
