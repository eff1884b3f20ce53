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
(0.5 s doubling to 30 s, back to 0.5 s after a frame got through). An open
that has not returned after its timeout (a FIFO with no writer, a hung
network mount or name lookup: no FFmpeg timeout reaches a blocked system
call) is counted once (``open_timeout``), logged and shown in
:attr:`FrameStream.status` while it waits. A packet that does not decode is
counted and skipped; many in a row count as a read failure.

Bounds: a source whose video stream declares more than ``max_pixels``
pixels is refused at open (``oversize``, reopened with the backoff), and
FFmpeg's own ``max_pixels`` option (:func:`decoder_max_pixels`: twice
that, for the codecs' coded-size alignment) is given to the demuxer's
probing decoder and to the decoder, so neither allocates a much larger
picture (a small PNG or H.264 stream declaring 16000x16000, or a size
change in mid-stream: such packets do not decode). A decoded frame with more pixels
is skipped before it is converted (``skipped``, by :data:`SKIP_REASONS`).
Pacing never waits longer than :attr:`Pacer.ahead_max_s`: a frame due
further ahead (a timestamp jump, a damaged PTS) restarts the clock and is
counted (``timestamp``).

Logs, statuses and error messages name a source by
:func:`describe_source` (a URL's scheme, host and port; a device's path;
only the suffix of a file): credentials and patients' names in paths never
reach them.

PyAV is imported when a stream is first opened (:func:`require_av`), never
at import: the daemon loads it only when a ``[[capture]]`` is configured.

Examples
--------
>>> source_kind("/dev/video0"), source_kind("rtsp://10.0.0.2/live"), source_kind("/srv/cine.mp4")
('device', 'url', 'file')
>>> describe_source("rtsp://user:secret@10.0.0.2:554/live?token=x"), describe_source("/srv/Doe^John/cine.mp4")
('rtsp://10.0.0.2:554', 'a .mp4 file')
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
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from edge.config import CAPTURE_MAX_FPS, CAPTURE_MIN_FPS, CaptureConfig
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
    "decoder_max_pixels",
    "describe_source",
    "require_av",
    "source_kind",
]

_log = logging.getLogger(__name__)

#: why a source failed (``medge_capture_errors_total{reason}``): ``open`` (cannot be opened, or has no
#: video stream), ``open_timeout`` (an open still blocked after its timeout; counted once per open),
#: ``oversize`` (its video stream declares more than ``max_pixels`` pixels; refused at open), ``read``
#: (reading stopped: device gone, stream ended, too many undecodable packets), ``decode`` (one packet did
#: not decode; skipped), ``timestamp`` (a frame due too far ahead: its clock restarted)
ERROR_REASONS = ("open", "open_timeout", "oversize", "read", "decode", "timestamp")
#: what :class:`FrameStream`'s warnings say for a reason that makes it reopen the source
_FAILED = {"open": "cannot open", "oversize": "refused", "read": "cannot read"}
#: why a decoded frame was not submitted (``medge_capture_frames_skipped_total{reason}``)
SKIP_REASONS = ("oversize", "crop", "rate")

_RETRY_BASE_S = 0.5
_RETRY_MAX_S = 30.0
_OPEN_TIMEOUT_S = 10.0
_READ_TIMEOUT_S = 5.0
_LATE_REANCHOR_S = 0.25  # a paced source this late starts its clock again rather than bursting to catch up
_AHEAD_MAX_S = 1.0  # a frame is never due further ahead than this (or two frame intervals, if longer)
_CODED_SLACK_PX = 256 * 256  # FFmpeg checks the coded size (aligned up to 16 to 64 pixels), not the shown one


def decoder_max_pixels(max_pixels: int) -> int:
    """FFmpeg's ``max_pixels`` for a capture's ``max_pixels``: twice it plus 256x256 pixels.

    FFmpeg bounds the coded picture, which codecs align up (1080 lines are
    coded as 1088, 120 as 128, or 192 for 64-pixel blocks); the slack keeps
    every frame within ``max_pixels`` decodable while a picture declaring
    far more (a 16000x16000 PNG) is never allocated.

    >>> decoder_max_pixels(1920 * 1080)
    4212736
    """
    return 2 * int(max_pixels) + _CODED_SLACK_PX
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


def describe_source(source: str) -> str:
    """How logs, statuses and messages name a source: never credentials, a query or a file's path.

    A URL: ``scheme://host:port`` (no user or password, path or query); a
    device: its ``/dev`` path; a file: only its suffix (the capture's
    configured name identifies it; a file name may hold a patient's name).

    >>> [describe_source(s) for s in ("rtsp://admin:pw@[fe80::1]:8554/ch1", "udp://239.0.0.1", "/dev/video2")]
    ['rtsp://[fe80::1]:8554', 'udp://239.0.0.1', '/dev/video2']
    >>> describe_source("/data/Doe John 1970/run"), describe_source("http://a b")
    ('a file', 'a http:// URL')
    """
    kind = source_kind(source)
    if kind == "device":
        return source if re.fullmatch(r"/dev/[A-Za-z0-9._/-]{1,64}", source) else "a device"
    if kind == "file":
        suffix = re.search(r"\.([A-Za-z0-9]{1,8})$", source.rsplit("/", 1)[-1])
        return f"a .{suffix.group(1).lower()} file" if suffix else "a file"
    scheme = source.split("://", 1)[0].lower()
    try:
        parts = urllib.parse.urlsplit(source)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        host, port = "", None
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,253}", host):
        return f"a {scheme}:// URL"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


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
        The rate used with ``fps = -1`` for frames without a timestamp (kept
        within 0.1 to 1000; anything else: 30).

    Attributes
    ----------
    jumps : int
        Frames that were due further ahead than :attr:`ahead_max_s` (their clock restarted).

    Notes
    -----
    A paced source keeps its own clock: frame *n* is due at ``anchor + n /
    fps`` (or ``anchor + t - t0`` from its timestamps). The clock starts
    again when the source falls behind by more than 0.25 s (slow decoding,
    a stalled network: a late source never bursts frames to catch up), when
    its timestamps go backwards (a looped file), when a frame would be due
    more than :attr:`ahead_max_s` ahead (a timestamp jump or a damaged PTS:
    counted in :attr:`jumps`) and after :meth:`restart` (a source reopened).
    A restarted clock continues one frame interval after the last frame's
    due time (or now, if that has passed): a looped one-frame file plays at
    the rate, it does not spin.
    """

    def __init__(self, fps: float, kind: str, fallback_fps: float = 30.0) -> None:
        self.fps = float(fps)
        self.kind = kind
        self.fallback_fps = _usable_rate(fallback_fps)
        self.jumps = 0
        self._last_due: float | None = None
        self.restart()

    @property
    def interval(self) -> float:
        """Seconds between frames at ``fps``, or at ``fallback_fps`` when it follows timestamps."""
        return 1.0 / (self.fps if self.fps > 0 else self.fallback_fps)

    @property
    def ahead_max_s(self) -> float:
        """The furthest ahead a frame is ever due, so the longest pacing wait: 1 s or two intervals."""
        return max(_AHEAD_MAX_S, 2.0 * self.interval)

    def restart(self, fallback_fps: float | None = None) -> None:
        """Forget the clock (a source reopened); the next frame comes one interval after the last one."""
        if fallback_fps is not None:
            self.fallback_fps = _usable_rate(fallback_fps)
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
        at = self._on_clock(t_src)
        self._last_t = t_src
        if at is not None and at > now + self.ahead_max_s:
            self.jumps += 1
            at = None
        if at is None or at < now - _LATE_REANCHOR_S:
            at = self._reanchor(t_src, now)
        self._n += 1
        self._last_due = at
        return at

    def _on_clock(self, t_src: float | None) -> float | None:
        """The frame's time on the running clock; ``None``: no clock yet, or its timestamps went backwards."""
        if self._anchor is None:
            return None
        if self.fps < 0 and t_src is not None:
            if self._last_t is not None and t_src < self._last_t:
                return None  # a looped file or a restarted stream
            return self._anchor + (t_src - self._t0)
        return self._anchor + self._n * self.interval

    def _reanchor(self, t_src: float | None, now: float) -> float:
        """Start the clock at this frame: one interval after the last due time, or now if that has passed."""
        start = now if self._last_due is None else max(now, self._last_due + self.interval)
        start = min(start, now + self.ahead_max_s)
        self._anchor, self._t0, self._n = start, (t_src or 0.0), 0
        return start

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


def _usable_rate(fps: float) -> float:
    """A stream's declared rate if it is one a pacer can use (0.1 to 1000 frames a second), else 30."""
    try:
        rate = float(fps)
    except (TypeError, ValueError, ZeroDivisionError):
        return 30.0
    return rate if CAPTURE_MIN_FPS <= rate <= CAPTURE_MAX_FPS else 30.0


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
    open_timeout_s : float
        An open of a file that has not returned after this long is counted
        (``open_timeout``), logged and shown in :attr:`status`; for a device
        or URL, which FFmpeg itself times out (this long to connect, as long
        again to find the streams), after twice this plus a second.

    Notes
    -----
    Iterate from one thread. :meth:`stop` (any thread) ends the iteration
    at the next frame or backoff wait; an open or read blocked inside a
    system call (a device driver, a FIFO) returns only when the source
    delivers or fails.
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
        open_timeout_s: float = _OPEN_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.kind = source_kind(config.source)
        self.described = describe_source(config.source)
        self.converter = FrameConverter(config.color, config.crop, config.max_pixels)
        self.pacer = Pacer(config.fps, self.kind)
        self._retry = (float(retry_base_s), float(retry_max_s))
        self._give_up_after = int(give_up_after)
        self._opener = opener
        self._open_timeout_s = float(open_timeout_s)
        self._opening: object | None = None  # a token while an open runs (see _watch_open)
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

    @property
    def opening(self) -> bool:
        """Whether an open of the source is under way (it may be blocked: see ``open_timeout``)."""
        return self._opening is not None

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
                if self._stop.is_set() or self._finished():
                    return
                if self.kind != "file":
                    raise _SourceError("read", "the source ended")
                if self.yielded == got:  # a looped file with nothing usable must not spin
                    raise _SourceError("read", "no usable frame in the file")
            except _SourceError as exc:
                failures = 1 if self.yielded > got else failures + 1
                self._failed(exc, failures)
            finally:
                self._close()

    def _finished(self) -> bool:
        """At the end of a file that does not loop: mark it ended (True)."""
        if self.kind != "file" or self.config.loop:
            return False
        self.ended = True
        self.status = f"ended: end of file after {self.decoded} frames"
        _log.info("Capture %s: end of file after %d frames.", self.config.name, self.decoded)
        return True

    def _failed(self, exc: _SourceError, failures: int) -> None:
        """Count and log a failure, then wait out the backoff; raises :class:`SourceUnavailable` if told to."""
        self._count("error", self.errors, exc.reason)
        failed = _FAILED.get(exc.reason, "cannot use")
        if self._give_up_after and failures >= self._give_up_after:
            self.status = f"down: {exc.reason}: {exc.detail}"
            raise SourceUnavailable(
                f"{failed.capitalize()} {self.described} ({exc.detail}), {failures} time(s) in a row."
            ) from exc
        delay = min(self._retry[1], self._retry[0] * 2 ** max(0, failures - 1))
        self.status = f"down: {exc.reason}: {exc.detail}; retrying in {delay:.1f} s"
        self._throttle.warning(
            exc.reason, "Capture %s: %s %s (%s); retrying in %.1f s.",
            self.config.name, failed, self.described, exc.detail, delay,
        )
        self._stop.wait(delay)

    def _open(self) -> Any:
        """Open the source, under the open watchdog; raises :class:`_SourceError` (``open``, ``oversize``)."""
        token = object()
        watch = self._watch_open(token)
        try:
            self._container = self._open_container()
        finally:
            self._opening = None
            watch.cancel()
        video = self._container.streams.video
        if not video:
            raise _SourceError("open", "no video stream")
        self._bound_decoder(video[0])
        rate = video[0].average_rate
        self.pacer.restart(float(rate) if rate else 30.0)  # the clock continues after the last frame
        self.opened = True
        self.status = "up"
        return self._container

    def _open_container(self) -> Any:
        """``av.open`` with the kind's options, FFmpeg's ``max_pixels`` and (device, URL) timeouts."""
        cfg = self.config
        options = {"max_pixels": str(decoder_max_pixels(cfg.max_pixels))}  # also bounds the probing decoder
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
            return opener(cfg.source, options=options, **kwargs)
        except _source_errors() as exc:
            raise _SourceError("open", _describe(exc)) from exc

    def _bound_decoder(self, stream: Any) -> None:
        """Refuse a stream that declares more than ``max_pixels``; give its decoder FFmpeg's ``max_pixels``.

        The decoder then refuses (does not allocate) a larger picture later
        in the stream: such packets do not decode (``decode`` errors).
        """
        ctx = getattr(stream, "codec_context", None)
        if ctx is None:
            return
        width, height = int(getattr(ctx, "width", 0) or 0), int(getattr(ctx, "height", 0) or 0)
        if width * height > self.converter.max_pixels:
            raise _SourceError("oversize", f"its {width}x{height} frames are over max_pixels")
        if not getattr(ctx, "is_open", False):
            limit = str(decoder_max_pixels(self.converter.max_pixels))
            ctx.options = {**dict(getattr(ctx, "options", None) or {}), "max_pixels": limit}

    def _watch_open(self, token: object) -> threading.Timer:
        """A timer that reports an open still blocked after its timeout (see :meth:`_open_blocked`)."""
        limit = self._open_timeout_s if self.kind == "file" else 2 * self._open_timeout_s + 1.0
        self._opening = token
        watch = threading.Timer(limit, self._open_blocked, args=(token, limit))
        watch.name = f"medge-capture-{self.config.name}-open"
        watch.daemon = True
        watch.start()
        return watch

    def _open_blocked(self, token: object, limit: float) -> None:
        """The open watchdog fired: count it once, say so in the status, log it (rate-limited)."""
        if self._opening is not token or self._stop.is_set():
            return
        self._count("error", self.errors, "open_timeout")
        self.status = f"down: open_timeout: blocked opening the source for more than {limit:.0f} s"
        self._throttle.warning(
            "open_timeout", "Capture %s: opening %s has not returned after %.0f s; still waiting for it.",
            self.config.name, self.described, limit,
        )

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
            self._skip(why, frame)
            return None
        due = self._pace(frame.time, now)
        if due is None:
            self._count("skip", self.skipped, "rate")
            return None
        image = self.converter.convert(frame)
        self.last_frame = now
        self.status = "up"
        item = Captured(image, due, self.yielded)
        self.yielded += 1
        return item

    def _skip(self, why: str, frame: Any) -> None:
        """Count, show and log (rate-limited) a frame refused for its size or the crop."""
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

    def _pace(self, t_src: float | None, now: float) -> float | None:
        """The pacer's due time; a timestamp jump it absorbed is counted and logged (rate-limited)."""
        jumps = self.pacer.jumps
        due = self.pacer.due(t_src, now)
        if self.pacer.jumps > jumps:
            self._count("error", self.errors, "timestamp")
            self._throttle.warning(
                "timestamp", "Capture %s: a frame was due more than %.1f s ahead (its timestamps jumped); "
                "its clock restarted.", self.config.name, self.pacer.ahead_max_s,
            )
        return due
