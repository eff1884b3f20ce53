"""``medge capture SOURCE``: a scanner's video output (or a video file) to a model, with a latency summary.

SOURCE is a V4L2 device (``/dev/video0``: a capture card taking the
scanner's HDMI/DVI/SDI output), a video file, or a stream URL. Frames are
read as the daemon's ``[[capture]]`` reads them (PyAV: the ``capture``
extra): cropped to ``--crop x,y,w,h`` (the image area of the scanner's
screen), converted to gray (default) or ``--rgb``, paced at the file's own
rate (``--fps`` sets another; ``--fps 0``: as fast as it decodes; a device
delivers at its own rate, thinned to ``--fps`` when given).

Where they go:

* default: a running daemon over ZeroMQ protocol v1 (``--endpoint``, else
  ``MEDGE_ZMQ__INGEST``, else ``[zmq] ingest`` of ``--config``, else
  ``tcp://127.0.0.1:5555``), pipelined with at most ``--window`` frames in
  flight; a frame captured while the window is full waits, and a newer
  one replaces it (newest wins). Its results are published by the daemon
  as for any stream (``--stream``).
* ``--local``: the model runs in this process (engines from ``--config`` or
  ``MEDGE_ENGINES_DIR``, else the bundled ones); no daemon needed.

It prints one line per second (captured, sent, ok, dropped, errors,
skipped, p50/p99 latency from send to reply) and a summary, which also
counts the decoded frames that were not used, by reason (``oversize``,
``crop``, ``rate``); ``--json`` prints JSON lines. The source is named
without credentials, path or query (a URL's scheme, host and port; only a
file's suffix). ``--overlay-out FILE.mp4`` writes every answered frame
with the mask outlined and boxes drawn. To run a capture inside the daemon
instead (retried for ever, results on PUB), configure ``[[capture]]``
(docs/configuration.md).

A source that cannot be opened ends the run: a file at once, a device or
URL after 5 attempts with backoff: about 8 s when it refuses at once, up
to about a minute when it does not answer (each attempt waits up to 10 s).

Exit status: 0 every frame answered ``ok`` or ``dropped``; 1 errors,
timeouts, the source failed, or it decoded frames and none could be used
(all over ``--max-pixels`` or outside ``--crop``); 2 bad arguments; 3 no
daemon reachable.

Examples
--------
::

    medge capture /dev/video0 --model us-lesion-seg --crop 320,120,1280,840 --fps 30
    medge capture cine.mp4 --local --model us-lesion-seg --frames 300 --overlay-out overlay.mp4
    medge capture rtsp://10.0.0.7/live --endpoint tcp://10.0.0.2:5555 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from edge.errors import MedgeError

__all__ = ["configure_parser", "run", "parse_crop"]

_GIVE_UP_FILE = 1
_GIVE_UP_LIVE = 5
_EXIT_USAGE = 2


class _UsageError(MedgeError):
    """Arguments each valid alone that do not go together: a usage error (exit 2), as argparse's."""


def parse_crop(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` -> ``(x, y, w, h)``; x, y >= 0 and w, h >= 1.

    >>> parse_crop("10,20,300,200")
    (10, 20, 300, 200)
    """
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not x,y,w,h (four integers)") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: x and y must be >= 0, w and h >= 1")
    return x, y, w, h


def _fps(text: str) -> float:
    """``--fps``: -1, 0, or a rate within ``[[capture]] fps``'s bounds."""
    from edge.config import CAPTURE_MAX_FPS, CAPTURE_MIN_FPS, valid_capture_fps

    v = _number(text)
    if not valid_capture_fps(v):
        raise argparse.ArgumentTypeError(
            f"{text} is not -1 (the source's rate), 0 (as fast as decoded) or a rate from {CAPTURE_MIN_FPS:g} "
            f"to {CAPTURE_MAX_FPS:g}"
        )
    return v


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive(text: str) -> float:
    """A finite number > 0 (not NaN, not infinity)."""
    v = _number(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return v


def _count(text: str) -> int:
    """An integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return v


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The source, where frames go, and how they are read."""
    from edge.ops.curve import add_curve_arguments
    from edge.tools.endpoints import add_config_argument

    parser.description = __doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:4])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("source", help="/dev/videoN, a video file, or a stream URL")
    parser.add_argument("--model", default=None, help="model name (default: the daemon's default model)")
    parser.add_argument("--stream", default="capture", help="stream name of the results (default %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", default=None,
                       help="daemon ingest (default: MEDGE_ZMQ__INGEST, else [zmq] ingest of --config, "
                            "else tcp://127.0.0.1:5555)")
    where.add_argument("--local", action="store_true", help="run the model in this process instead of a daemon")
    add_config_argument(parser)
    parser.add_argument("--crop", type=parse_crop, default=None, metavar="X,Y,W,H",
                        help="the image area of the scanner's screen, in source pixels")
    color = parser.add_mutually_exclusive_group()
    color.add_argument("--gray", dest="color", action="store_const", const="gray", help="grayscale frames (default)")
    color.add_argument("--rgb", dest="color", action="store_const", const="rgb", help="RGB frames")
    parser.set_defaults(color="gray")
    parser.add_argument("--fps", type=_fps, default=-1.0,
                        help="-1: the source's rate (default); 0: as fast as decoded; else this rate")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--frames", type=_count, default=None, help="stop after this many captured frames")
    stop.add_argument("--duration-s", type=_positive, default=None, help="stop after this long")
    parser.add_argument("--loop", action="store_true", help="start a file again at its end")
    parser.add_argument("--window", type=_count, default=2, help="most frames in flight (default %(default)s)")
    parser.add_argument("--overlay-out", type=Path, default=None, metavar="FILE",
                        help="write the answered frames with outlines and boxes to this video file (.mp4)")
    parser.add_argument("--max-pixels", type=_count, default=3840 * 2160,
                        help="skip frames with more pixels (default %(default)s)")
    parser.add_argument("--video-size", default="", help="V4L2 device mode, e.g. 1920x1080")
    parser.add_argument("--input-format", default="", help="V4L2 device format, e.g. mjpeg or yuyv422")
    parser.add_argument("--reply-timeout-s", type=_positive, default=5.0)
    parser.add_argument("--connect-timeout-s", type=_positive, default=3.0)
    parser.add_argument("--json", action="store_true", help="print JSON lines (one per second, then the summary)")
    add_curve_arguments(parser)


def _say(args: argparse.Namespace, line: str) -> None:
    print(line, file=sys.stderr if args.json else sys.stdout, flush=True)


def _capture_config(args: argparse.Namespace) -> Any:
    """A ``CaptureConfig`` from the arguments (a relative file path made absolute).

    Raises
    ------
    _UsageError
        A crop holding more pixels than ``--max-pixels`` (no frame could ever be used).
    MedgeError
        A file source that does not exist (named without its path).
    """
    from edge.config import CaptureConfig
    from edge.ingest.capture_frames import describe_source, source_kind

    if args.crop and args.crop[2] * args.crop[3] > args.max_pixels:
        raise _UsageError(f"argument --crop: {args.crop[2]}x{args.crop[3]} holds more pixels than "
                          f"--max-pixels {args.max_pixels}")
    source = args.source
    if source_kind(source) == "file":
        path = Path(source).resolve()
        if not path.is_file():
            raise MedgeError(f"The source ({describe_source(source)}) is not a file, or does not exist.")
        source = str(path)
    return CaptureConfig(name="cli", source=source, model=args.model or "", stream=args.stream,
                         crop=tuple(args.crop or ()), color=args.color, fps=args.fps, loop=args.loop,
                         max_pixels=args.max_pixels, video_size=args.video_size, input_format=args.input_format)


def _transport(args: argparse.Namespace) -> tuple[Any, str]:
    """The transport and a line saying where frames go."""
    from edge.config import load_config
    from edge.ops.curve import curve_from_args
    from edge.tools.capture_client import LocalTransport, ZmqTransport
    from edge.tools.endpoints import resolve_client_endpoints

    if args.local:
        cfg = load_config(args.config)
        model = args.model or cfg.default_model
        return LocalTransport(cfg, model, args.stream), f"model {model} in this process (engines {cfg.engines_dir})"
    eps = resolve_client_endpoints(args.config, endpoint=args.endpoint)
    t = ZmqTransport(eps.zmq_ingest.value, model=args.model, stream=args.stream,
                     connect_timeout_s=args.connect_timeout_s, curve=curve_from_args(args))
    return t, f"endpoint: {eps.zmq_line()}, model {args.model or '(daemon default)'}"


def _tick_printer(args: argparse.Namespace) -> Any:
    def tick(s: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps({"type": "tick", **s}), flush=True)
            return
        lat = s["latency"]
        p50 = f"{lat['median_ms']:8.2f}" if lat.get("count") else f"{'-':>8}"
        p99 = f"{lat['p99_ms']:8.2f}" if lat.get("count") else f"{'-':>8}"
        print(f"{s['elapsed_s']:5.0f} {s['captured']:8d} {s['sent']:5d} {s['ok']:5d} {s['dropped']:7d} "
              f"{s['errors']:6d} {s['skipped']:7d} {p50} {p99}", flush=True)

    return tick


def run(args: argparse.Namespace) -> int:
    """Capture, send, print; see the module notes for the exit status."""
    from edge.ingest.capture_frames import FrameStream, SourceUnavailable, require_av, source_kind
    from edge.tools.capture_client import OverlayWriter, run_capture
    from edge.tools.endpoints import EXIT_FAILURES, EXIT_UNREACHABLE
    from edge.tools.zmq_client import NotConnectedError

    require_av()
    try:
        cap = _capture_config(args)
    except _UsageError as exc:
        print(f"medge capture: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    give_up = _GIVE_UP_FILE if source_kind(cap.source) == "file" else _GIVE_UP_LIVE
    frames = FrameStream(cap, give_up_after=give_up)
    try:
        transport, where = _transport(args)
    except NotConnectedError as exc:
        print(f"medge capture: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    _say(args, f"medge capture: {frames.described} ({frames.kind}, {cap.color}"
               f"{', crop ' + ','.join(map(str, cap.crop)) if cap.crop else ''}) -> {where}, stream {cap.stream!r}")
    if not args.json:
        print(f"{'t_s':>5} {'captured':>8} {'sent':>5} {'ok':>5} {'dropped':>7} {'errors':>6} {'skipped':>7} "
              f"{'p50_ms':>8} {'p99_ms':>8}")
    overlay = OverlayWriter(args.overlay_out, cap.fps if cap.fps > 0 else 30.0) if args.overlay_out else None
    failed = ""
    try:
        stats = run_capture(frames, transport, window=args.window, max_frames=args.frames,
                            duration_s=args.duration_s, reply_timeout_s=args.reply_timeout_s,
                            overlay=overlay, on_tick=_tick_printer(args))
    except NotConnectedError as exc:
        print(f"medge capture: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SourceUnavailable as exc:
        failed, stats = str(exc), None
    finally:
        transport.close()
        if overlay is not None:
            overlay.close()
    if stats is None:
        print(f"medge capture: error: {failed}", file=sys.stderr)
        return EXIT_FAILURES
    summary = stats.summary()
    _print_summary(args, summary, overlay)
    return _exit_status(summary)


def _print_summary(args: argparse.Namespace, summary: dict[str, Any], overlay: Any) -> None:
    """The summary: a JSON line with ``--json``, else one line (and the overlay's)."""
    if args.json:
        print(json.dumps({"type": "summary", **summary}), flush=True)
        return
    lat = summary["latency"]
    unused = summary["unused"]
    print(f"summary: {summary['captured']} captured ({summary['captured_fps']} fps), {summary['sent']} sent, "
          f"{summary['ok']} ok, {summary['dropped']} dropped, {summary['errors']} errors, "
          f"{summary['timeouts']} timeouts, {summary['skipped']} skipped (newest wins), "
          f"{sum(unused.values())} decoded frames not used ("
          + ", ".join(f"{reason} {n}" for reason, n in unused.items()) + "); latency "
          + (f"p50 {lat['median_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms"
             if lat.get("count") else "none"))
    if overlay is not None:
        print(f"overlay: {overlay.frames} frames in {overlay.path}")


def _exit_status(summary: dict[str, Any]) -> int:
    """1 for errors, timeouts, or decoded frames none of which could be used; else 0."""
    from edge.tools.endpoints import EXIT_FAILURES, EXIT_OK

    if summary["errors"] or summary["timeouts"]:
        return EXIT_FAILURES
    if summary["captured"] == 0 and sum(summary["unused"].values()):
        print("medge capture: error: no decoded frame could be used ("
              + ", ".join(f"{reason} {n}" for reason, n in summary["unused"].items() if n)
              + "): check --crop and --max-pixels against the source's frame size.", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK
