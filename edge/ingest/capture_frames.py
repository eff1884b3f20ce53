"""Frames from a video source: open (and reopen), decode, pace, crop and convert, through PyAV.

The reading half of capture ingest, shared by the daemon's ``[[capture]]``
sources (:mod:`edge.ingest.capture`) and ``medge capture``. A source is
one of (:func:`source_kind`):

* ``device``: a V4L2 device (``/dev/video0``), opened with FFmpeg's
  ``v4l2`` input (``video_size``, ``input_format`` and, with ``fps`` > 0,
  ``framerate`` passed as its options). It delivers at its own rate: frames
  are never delayed, only thinned to ``fps`` when one is set.
* ``url``: a stream (``rtsp://``, ``http://``, ``udp://`` ...), paced like a file.
* ``file``: a video file, paced at its own frame rate (``fps = -1``), at
  ``fps``, or read as fast as it decodes (``fps = 0``); ``loop`` starts it
  again at its end.

:class:`FrameStream` yields :class:`Captured` frames and never raises for
the source's problems: a source that cannot be opened, stops delivering,
or disappears (a device unplugged) is logged (rate-limited), counted
(``errors``, by :data:`ERROR_REASONS`) and reopened after a backoff
(0.5 s doubling to 30 s, back to 0.5 s after a frame got through). A packet
that does not decode is counted and skipped; many in a row count as a read
failure. Bounds: a frame with more than ``max_pixels`` pixels is skipped
before it is converted (``skipped``, by :data:`SKIP_REASONS`).

PyAV is imported when a stream is first opened (:func:`require_av`), never
at import: the daemon loads it only when a ``[[capture]]`` is configured.

Examples
--------
>>> source_kind("/dev/video0"), source_kind("rtsp://10.0.0.2/live"), source_kind("/srv/cine.mp4")
('device', 'url', 'file')
>>> p = Pacer(fps=10.0, kind="file")
>>> [round(p.due(None, now=0.0), 3) for _ in range(3)]
[0.0, 0.1, 0.2]
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from edge.config import CaptureConfig
from edge.errors import ConfigError, MedgeError
from edge.ops.boundary import LogThrottle

__all__ = [
    "ERROR_REASONS",
    "SKIP_REASONS",
    "Captured",
    "FrameConverter",
    "FrameStream",
    "Pacer",
    "SourceUnavailable",
    "av_available",
    "require_av",
    "source_kind",
]

_log = logging.getLogger(__name__)

#: why a source failed (``medge_capture_errors_total{reason}``): ``open`` (cannot be opened, or has no
#: video stream), ``read`` (reading stopped: device gone, stream ended, too many undecodable packets),
#: ``decode`` (one packet did not decode; skipped)
ERROR_REASONS = ("open", "read", "decode")
#: why a decoded frame was not submitted (``medge_capture_frames_skipped_total{reason}``)
SKIP_REASONS = ("oversize", "crop", "rate")

_RETRY_BASE_S = 0.5
_RETRY_MAX_S = 30.0
_OPEN_TIMEOUT_S = 10.0
_READ_TIMEOUT_S = 5.0
_LATE_REANCHOR_S = 0.25  # a paced source this late starts its clock again rather than bursting to catch up
_STALE_S = 5.0  # no frame for this long: the source is not "up"
_DECODE_ERRORS_MAX = 50  # undecodable packets in a row before the source is reopened
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def source_kind(source: str) -> str:
    """``device`` (``/dev/...``), ``url`` (``scheme://...``) or ``file``."""
    if source.startswith("/dev/"):
        return "device"
    if _URL.match(source):
        return "url"
    return "file"


def av_available() -> bool:
    """Whether PyAV (the ``capture`` extra) is installed, without importing it."""
    return importlib.util.find_spec("av") is not None


def require_av() -> Any:
    """The ``av`` module.

    Raises
    ------
    ConfigError
        If PyAV is not installed (naming the extra that installs it).
    """
    try:
        return importlib.import_module("av")
    except ImportError as exc:
        raise ConfigError(
            f"Capture needs PyAV, which is not installed ({exc}); install it with: pip install 'medge[capture]'."
        ) from exc


@dataclass(frozen=True)
class Captured:
    """One frame ready to submit.

    Attributes
    ----------
    image : numpy.ndarray
        uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (rgb), cropped, C-contiguous.
    due : float
        ``time.monotonic()`` at which to submit it (pacing; now or earlier: at once).
    index : int
        Frames yielded by this stream before this one.
    """

    image: np.ndarray
    due: float
    index: int


class Pacer:
    """When each decoded frame is due, or ``None`` when it is to be skipped (a device thinned to ``fps``).

    Parameters
    ----------
    fps : float
        -1: the source's own timestamps; 0: at once; > 0: that rate.
    kind : str
        :func:`source_kind` of the source; a ``device`` is never delayed.
    fallback_fps : float
        The rate used with ``fps = -1`` for frames without a timestamp.

    Notes
    -----
    A paced source keeps its own clock: frame *n* is due at ``anchor + n /
    fps`` (or ``anchor + t - t0`` from its timestamps). When it falls behind
    by more than 0.25 s (slow decoding, a stalled network) or its timestamps
    go backwards (a looped file), the clock starts again at the present: a
    late source never bursts frames to catch up.
    """

    def __init__(self, fps: float, kind: str, fallback_fps: float = 30.0) -> None:
        self.fps = float(fps)
        self.kind = kind
        self.fallback_fps = fallback_fps if fallback_fps > 0 else 30.0
        self.restart()

    def restart(self) -> None:
        """Forget the clock (a source reopened)."""
        self._anchor: float | None = None
        self._t0 = 0.0
        self._n = 0
        self._last_t: float | None = None
        self._next_slot: float | None = None

    def due(self, t_src: float | None, now: float) -> float | None:
        """When the frame with source time ``t_src`` (seconds, or None) is due; ``None``: skip it."""
        if self.kind == "device":
            return self._thin(now)
        if self.fps == 0:
            return now
        if self.fps < 0 and t_src is not None and (self._last_t is None or t_src >= self._last_t):
            offset = None if self._anchor is None else t_src - self._t0
        elif self.fps < 0 and t_src is not None:
            offset = None  # went backwards: a looped file or a restarted stream
        else:
            offset = None if self._anchor is None else self._n / (self.fps if self.fps > 0 else self.fallback_fps)
        self._last_t = t_src
        if offset is None or self._anchor is None or self._anchor + offset < now - _LATE_REANCHOR_S:
            self._anchor, self._t0, self._n = now, (t_src or 0.0), 0
            offset = 0.0
        self._n += 1
        return self._anchor + offset

    def _thin(self, now: float) -> float | None:
        """A device: every frame at once, or (``fps`` > 0) at most ``fps`` of them a second."""
        if self.fps <= 0:
            return now
        interval = 1.0 / self.fps
        slot = self._next_slot
        if slot is not None and now < slot - interval * 0.25:  # a quarter-interval of jitter is tolerated
            return None
        base = now if slot is None or now - slot > interval else slot
        self._next_slot = base + interval
        return now


class FrameConverter:
    """A decoded frame to the array submitted: size bound, crop, ``gray`` or ``rgb``.

    Parameters
    ----------
    color : str
        ``gray`` (uint8 ``[H, W]``) or ``rgb`` (uint8 ``[H, W, 3]``).
    crop : tuple of int
        ``(x, y, w, h)`` in source pixels, or empty for the whole frame.
    max_pixels : int
        A frame with more pixels (before the crop) is refused unconverted.
    """

    def __init__(self, color: str, crop: tuple[int, ...], max_pixels: int) -> None:
        if color not in ("gray", "rgb"):
            raise ConfigError(f"Capture color {color!r} is not 'gray' or 'rgb'.")
        if crop and len(crop) != 4:
            raise ConfigError(f"Capture crop {list(crop)} is not [x, y, w, h].")
        self.format = "gray" if color == "gray" else "rgb24"
        self.crop = tuple(int(v) for v in crop)
        self.max_pixels = int(max_pixels)

    def refusal(self, width: int, height: int) -> str:
        """Why a ``width`` x ``height`` frame cannot be converted (a :data:`SKIP_REASONS` value), or ''."""
        if width * height > self.max_pixels:
            return "oversize"
        if self.crop:
            x, y, w, h = self.crop
            if x + w > width or y + h > height:
                return "crop"
        return ""

    def convert(self, frame: Any) -> np.ndarray:
        """The uint8 array of a PyAV ``VideoFrame`` (call :meth:`refusal` first)."""
        image = frame.to_ndarray(format=self.format)
        if self.crop:
            x, y, w, h = self.crop
            image = image[y : y + h, x : x + w]
        return np.ascontiguousarray(image)


class SourceUnavailable(MedgeError):
    """A :class:`FrameStream` with ``give_up_after`` failed that many times in a row (the message says why)."""


class _SourceError(Exception):
    """The source failed: ``reason`` is one of :data:`ERROR_REASONS`; ``detail`` never quotes frame data."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@functools.lru_cache(maxsize=1)
def _source_errors() -> tuple[type[BaseException], ...]:
    """What PyAV raises for a source's problems: ``av.FFmpegError`` (and the OS errors of its I/O)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    av = importlib.import_module("av") if av_available() else None
    return errors + ((av.FFmpegError,) if av is not None else ())


def _describe(exc: BaseException) -> str:
    """A short description of a PyAV/OS error: its type and FFmpeg's error text (never frame data)."""
    text = getattr(exc, "strerror", None) or ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FrameStream:
    """The frames of one ``[[capture]]`` source, for as long as it is iterated (see the module notes).

    Parameters
    ----------
    config : CaptureConfig
    metrics : CaptureMetrics, optional
        ``metrics_for(registry).capture``; counts are also kept in
        :attr:`errors`, :attr:`skipped` and :attr:`decoded`.
    retry_base_s, retry_max_s : float
        Backoff of reopening.
    give_up_after : int
        Raise :class:`SourceUnavailable` after this many failures in a row
        without a frame (0: retry for ever, as the daemon does).
    opener : callable, optional
        ``av.open`` (tests pass another).

    Notes
    -----
    Iterate from one thread. :meth:`stop` (any thread) ends the iteration
    at the next frame or backoff wait; a read blocked inside a device
    driver returns only when the device delivers or fails.
    """

    def __init__(
        self,
        config: CaptureConfig,
        metrics: Any = None,
        *,
        retry_base_s: float = _RETRY_BASE_S,
        retry_max_s: float = _RETRY_MAX_S,
        give_up_after: int = 0,
        opener: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config
        self.kind = source_kind(config.source)
        self.converter = FrameConverter(config.color, config.crop, config.max_pixels)
        self.pacer = Pacer(config.fps, self.kind)
        self._retry = (float(retry_base_s), float(retry_max_s))
        self._give_up_after = int(give_up_after)
        self._opener = opener
        self._stop = threading.Event()
        self._throttle = LogThrottle(_log, interval_s=30.0)
        self.errors = dict.fromkeys(ERROR_REASONS, 0)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.decoded = 0
        self.yielded = 0
        self.opened = False
        self.ended = False
        self.last_frame = -_STALE_S  # time.monotonic() of the last frame yielded
        self.status = "starting"
        self._container: Any = None
        self._m = self._children(metrics, config.name)

    @staticmethod
    def _children(metrics: Any, name: str) -> dict[str, Any]:
        """The metric children of this capture, created at 0 (``{}`` without metrics)."""
        if metrics is None:
            return {}
        kids: dict[str, Any] = {"frames": metrics.frames.labels(capture=name)}
        for reason in ERROR_REASONS:
            kids[f"error:{reason}"] = metrics.errors.labels(capture=name, reason=reason)
        for reason in SKIP_REASONS:
            kids[f"skip:{reason}"] = metrics.skipped.labels(capture=name, reason=reason)
        return kids

    @property
    def up(self) -> bool:
        """Open, and a usable frame (not skipped for its size or the crop) came within the last 5 s."""
        return self.opened and time.monotonic() - self.last_frame < _STALE_S

    def stop(self) -> None:
        """End the iteration (and any backoff wait) soon."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def _count(self, key: str, table: dict[str, int], reason: str) -> None:
        table[reason] += 1
        child = self._m.get(f"{key}:{reason}")
        if child is not None:
            child.inc()

    def __iter__(self) -> Iterator[Captured]:
        failures = 0
        while not self._stop.is_set():
            got = self.yielded
            try:
                yield from self._frames_of(self._open())
                if self._stop.is_set():
                    return
                if self.kind == "file" and not self.config.loop:
                    self.ended = True
                    self.status = f"ended: end of file after {self.decoded} frames"
                    _log.info("Capture %s: end of file after %d frames.", self.config.name, self.decoded)
                    return
                if self.kind != "file":
                    raise _SourceError("read", "the source ended")
                if self.yielded == got:  # a looped file with nothing usable must not spin
                    raise _SourceError("read", "no usable frame in the file")
            except _SourceError as exc:
                self._count("error", self.errors, exc.reason)
                failures = 1 if self.yielded > got else failures + 1
                if self._give_up_after and failures >= self._give_up_after:
                    self.status = f"down: {exc.reason}: {exc.detail}"
                    raise SourceUnavailable(
                        f"Cannot {exc.reason} {self.config.source} ({exc.detail}), {failures} time(s) in a row."
                    ) from exc
                delay = min(self._retry[1], self._retry[0] * 2 ** max(0, failures - 1))
                self.status = f"down: {exc.reason}: {exc.detail}; retrying in {delay:.1f} s"
                self._throttle.warning(
                    exc.reason, "Capture %s: cannot %s %s (%s); retrying in %.1f s.",
                    self.config.name, exc.reason, self.config.source, exc.detail, delay,
                )
                self._stop.wait(delay)
            finally:
                self._close()

    def _open(self) -> Any:
        """Open the source; raises :class:`_SourceError` (``open``)."""
        cfg = self.config
        options: dict[str, str] = {}
        kwargs: dict[str, Any] = {}
        if self.kind == "device":
            kwargs["format"] = "v4l2"
            if cfg.video_size:
                options["video_size"] = cfg.video_size
            if cfg.input_format:
                options["input_format"] = cfg.input_format
            if cfg.fps > 0:
                options["framerate"] = f"{cfg.fps:g}"
        if self.kind != "file":
            kwargs["timeout"] = (_OPEN_TIMEOUT_S, _READ_TIMEOUT_S)
        opener = self._opener or require_av().open
        try:
            self._container = opener(cfg.source, options=options, **kwargs)
        except _source_errors() as exc:
            raise _SourceError("open", _describe(exc)) from exc
        video = self._container.streams.video
        if not video:
            raise _SourceError("open", "no video stream")
        rate = video[0].average_rate
        self.pacer = Pacer(cfg.fps, self.kind, float(rate) if rate else 30.0)
        self.opened = True
        self.status = "up"
        return self._container

    def _close(self) -> None:
        container, self._container = self._container, None
        self.opened = False
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - closing a failed source must not end the loop
                _log.debug("Closing capture source %s failed.", self.config.name, exc_info=True)

    def _frames_of(self, container: Any) -> Iterator[Captured]:
        """Decode, pace, convert; returns at the end of the source; raises :class:`_SourceError`."""
        stream = container.streams.video[0]
        bad_in_row = 0
        try:
            packets = container.demux(stream)
            for packet in packets:
                if self._stop.is_set():
                    return
                try:
                    decoded = packet.decode()
                except _source_errors() as exc:  # one undecodable packet: skip it
                    self._count("error", self.errors, "decode")
                    bad_in_row += 1
                    if bad_in_row >= _DECODE_ERRORS_MAX:
                        raise _SourceError("read", f"{bad_in_row} packets in a row did not decode") from exc
                    continue
                bad_in_row = 0
                for frame in decoded:
                    item = self._prepare(frame)
                    if item is not None:
                        yield item
        except _SourceError:
            raise
        except _source_errors() as exc:
            raise _SourceError("read", _describe(exc)) from exc

    def _prepare(self, frame: Any) -> Captured | None:
        """Count, bound, pace and convert one decoded frame (``None``: skipped)."""
        self.decoded += 1
        now = time.monotonic()
        kid = self._m.get("frames")
        if kid is not None:
            kid.inc()
        why = self.converter.refusal(int(frame.width), int(frame.height))
        if why:
            self._count("skip", self.skipped, why)
            self.status = (
                f"crop {list(self.converter.crop)} does not fit {frame.width}x{frame.height} frames"
                if why == "crop"
                else f"{frame.width}x{frame.height} frames are over max_pixels"
            )
            self._throttle.warning(
                f"skip:{why}", "Capture %s: %dx%d frames skipped (%s).", self.config.name, frame.width, frame.height,
                "over max_pixels" if why == "oversize" else "the crop does not fit",
            )
            return None
        due = self.pacer.due(frame.time, now)
        if due is None:
            self._count("skip", self.skipped, "rate")
            return None
        image = self.converter.convert(frame)
        self.last_frame = now
        self.status = "up"
        item = Captured(image, due, self.yielded)
        self.yielded += 1
        return item
