#!/usr/bin/env python3
"""Capture frame timing: a 30 fps cine through ``[[capture]]`` for 60 s, with no backlog growth.

Issue 15's check of capture ingest: a synthetic ultrasound cine (480 x 640,
:func:`edge.tools.synthetic.make_source`) is encoded to H.264 (MJPEG where
PyAV has no libx264), and the daemon, in this process, reads it through a
``[[capture]]`` (looped, paced at the file's 30 fps) into the bundled
``us-lesion-seg`` with the default configuration. While it runs, the script
samples the model's queue depth and the frames captured, answered and
shed twice a second, and subscribes to the stream's PUB topic as a viewer
would.

Reported, and recorded to ``benchmarks/results/`` (JSON and Markdown, with
the machine and date):

- frames captured and submitted per second (target: the file's 30 fps);
- frames shed (``medge_frames_dropped_total``) and refused (``overloaded``);
- queue depth (target: at most ``stream_backlog``) and the frames pending
  (queued or in a running batch): maximum and the slope of a line fitted
  to them over time (target: not growing);
- latency from capture (the result's ``sent_ns``) to the viewer receiving
  the result, p50 / p99 / max;
- the capture thread's own CPU time per frame (decode, convert, submit).

The targets are printed as pass/fail; the process exits 0 either way (a
record, not a test; the suite runs a 3 s version:
``tests/edge/test_capture.py::test_a_30_fps_capture_keeps_the_backlog_bounded``).

Usage::

    python benchmarks/capture_timing.py [--seconds 60] [--fps 30] [--model us-lesion-seg] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.config import load_config  # noqa: E402
from edge.daemon import Daemon  # noqa: E402
from edge.inference.manifest import default_engines_dir  # noqa: E402
from edge.tools.results import machine_info, summarize_ms  # noqa: E402
from edge.tools.synthetic import make_source  # noqa: E402
from edge.tools.zmq_client import ZmqSubscriber  # noqa: E402


def encode_cine(path_stem: Path, fps: int, height: int, width: int, frames: int = 90) -> Path:
    """A looping synthetic ultrasound cine (H.264 in MPEG-TS, else MJPEG in Matroska)."""
    import av

    h264 = "libx264" in av.codecs_available
    path = path_stem.with_suffix(".ts" if h264 else ".mkv")
    src = make_source("ultrasound", height, width, "uint8", seed=1, loop=32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if h264 else "mjpeg", rate=fps)
        stream.height, stream.width = height, width
        stream.pix_fmt = "yuv420p" if h264 else "yuvj420p"
        if h264:
            stream.options = {"preset": "veryfast", "crf": "20"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(src.frame(i), format="gray")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _config(tmp: Path, engines: Path, model: str, cine: Path, precision: str, spin_us: int | None = None,
            max_batch: int | None = None) -> Any:
    path = tmp / "medge.toml"
    path.write_text(
        f'engines_dir = "{engines}"\nspool_dir = "{tmp / "spool"}"\n'
        '[zmq]\ningest = "tcp://127.0.0.1:*"\npublish = "tcp://127.0.0.1:*"\n[metrics]\nport = 0\n'
        f'[dicom]\nenabled = false\n[[models]]\nname = "{model}"\n'
        + (f'precision = "{precision}"\n' if precision else "")
        + (f"spin_us = {spin_us}\n" if spin_us is not None else "")
        + (f"max_batch = {max_batch}\n" if max_batch is not None else "")
        +
        f'[[capture]]\nname = "probe"\nsource = "{cine}"\nmodel = "{model}"\nloop = true\n',
        encoding="utf-8",
    )
    return load_config(path, env={})


def _metric(daemon: Daemon, name: str, **labels: str) -> float:
    for family in daemon.metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


class _Viewer(threading.Thread):
    """A PUB subscriber: capture-to-viewer latency from each result's ``sent_ns``."""

    def __init__(self, endpoint: str, stream: str) -> None:
        super().__init__(name="viewer", daemon=True)
        self.sub = ZmqSubscriber(endpoint, [stream])
        self.latencies_ms: list[float] = []
        self.status: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            got = self.sub.recv(0.2)
            if got is None:
                continue
            now = time.time_ns()
            hdr = got.reply.header
            self.status[hdr["status"]] = self.status.get(hdr["status"], 0) + 1
            if hdr["status"] == "ok":
                self.latencies_ms.append((now - int(hdr["sent_ns"])) / 1e6)
        self.sub.close()


def _thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc (0.0 where unavailable)."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sample(daemon: Daemon, model: str, t0: float) -> dict[str, float]:
    src, sched = daemon.captures[0], daemon.scheduler
    assert sched is not None
    return {
        "t_s": round(time.monotonic() - t0, 3),
        "decoded": src.reader.decoded,
        "submitted": src.submitted,
        "pending": sched.pending(),
        "queue_depth": _metric(daemon, "medge_queue_depth", model=model),
        "dropped": _metric(daemon, "medge_frames_dropped_total", model=model, reason="stream_backlog"),
    }


def measure(daemon: Daemon, model: str, seconds: float) -> dict[str, Any]:
    """Run for ``seconds`` (after a 2 s warm-up), sampling twice a second."""
    assert daemon.zmq is not None
    viewer = _Viewer(daemon.zmq.publish_endpoint, "probe")
    viewer.start()
    time.sleep(2.0)  # warm-up: the subscription reaches the daemon, the model's first batches
    viewer.latencies_ms.clear()
    thread = daemon.captures[0]._thread  # noqa: SLF001 - the capture thread's CPU time, from /proc
    tid = thread.native_id if thread is not None else None
    cpu0 = _thread_cpu_s(tid)
    t0 = time.monotonic()
    first = _sample(daemon, model, t0)
    samples = [first]
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        samples.append(_sample(daemon, model, t0))
    cpu = _thread_cpu_s(tid) - cpu0
    viewer.stop.set()
    viewer.join(2.0)
    last = samples[-1]
    span = last["t_s"] - first["t_s"]
    t = np.array([s["t_s"] for s in samples])
    pending = np.array([s["pending"] for s in samples])
    return {
        "seconds": round(span, 2),
        "submitted": int(last["submitted"] - first["submitted"]),
        "submitted_fps": round((last["submitted"] - first["submitted"]) / span, 2),
        "decoded_fps": round((last["decoded"] - first["decoded"]) / span, 2),
        "capture_thread_cpu_ms_per_frame": round(1000 * cpu / max(1, last["decoded"] - first["decoded"]), 2),
        "dropped": int(last["dropped"] - first["dropped"]),
        "refused_overloaded": int(_metric(daemon, "medge_requests_failed_total", source="capture", code="overloaded")),
        "queue_depth_max": max(s["queue_depth"] for s in samples),
        "pending_max": int(pending.max()),
        "pending_slope_per_min": round(float(np.polyfit(t, pending, 1)[0]) * 60.0, 3),
        "viewer": {"received": viewer.status, "latency": summarize_ms(viewer.latencies_ms)},
        "samples": samples,
    }


def _markdown(result: dict[str, Any]) -> str:
    m, r, machine = result["measured"], result["targets"], result["machine"]
    lat = m["viewer"]["latency"]
    lines = [
        f"# Capture timing, {result['date_utc']}",
        "",
        f"Machine: {machine['cpu_model']} ({machine['cpu_usable']} cores), Python {machine['versions']['python']}, "
        f"onnxruntime {machine['versions'].get('onnxruntime')}, PyAV {result['pyav']}; load average "
        f"{machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end (shared machine).",
        "",
        f"Source: {result['source']}; model {result['model']} ({result['precision']}), "
        f"stream_backlog {result['stream_backlog']}; {m['seconds']:.0f} s measured after a 2 s warm-up.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| submitted | {m['submitted']} ({m['submitted_fps']} fps; decoded {m['decoded_fps']} fps) |",
        f"| capture thread CPU (decode, convert, submit) | {m['capture_thread_cpu_ms_per_frame']} ms per frame |",
        f"| shed (stream_backlog) / refused (overloaded) | {m['dropped']} / {m['refused_overloaded']} |",
        f"| queue depth max / pending max | {m['queue_depth_max']:.0f} / {m['pending_max']} |",
        f"| pending slope | {m['pending_slope_per_min']} frames per minute |",
        "| capture to viewer latency p50 / p99 / max | "
        + (f"{lat['median_ms']:.1f} / {lat['p99_ms']:.1f} / {lat['max_ms']:.1f} ms |"
           if lat.get("count") else "none |"),
        "",
        "Targets: " + ", ".join(f"{k} **{'pass' if v else 'FAIL'}**" for k, v in r.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--frame", default="480x640", help="HxW of the cine (default %(default)s)")
    ap.add_argument("--model", default="us-lesion-seg")
    ap.add_argument("--precision", default="", help="[[models]] precision (default: the configuration's default)")
    ap.add_argument("--spin-us", type=int, default=None,
                    help="[[models]] spin_us (default: the configuration's default, 1000)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="[[models]] max_batch (default: the [scheduler] value, 4)")
    ap.add_argument("--engines-dir", type=Path, default=default_engines_dir())
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import av

    h, w = (int(v) for v in args.frame.lower().split("x"))
    machine = {**machine_info(), "host": platform.node(), "loadavg_start": os.getloadavg()}
    date = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="medge-capture-") as tmp:
        cine = encode_cine(Path(tmp) / "cine", args.fps, h, w)
        with Daemon(_config(Path(tmp), args.engines_dir, args.model, cine, args.precision, args.spin_us, args.max_batch)) as daemon:
            assert daemon.scheduler is not None
            policy = daemon.scheduler.policy(args.model)
            backlog, in_batches = policy.stream_backlog, policy.max_batch * policy.workers
            precision = next(m.precision for m in daemon.models if m.name == args.model)
            print(f"{cine.suffix} cine {h}x{w} at {args.fps} fps -> {args.model} ({precision}) for {args.seconds:g} s",
                  flush=True)
            measured = measure(daemon, args.model, args.seconds)
    machine["loadavg_end"] = os.getloadavg()
    targets = {
        f"submitted at >= 95% of {args.fps} fps": measured["submitted_fps"] >= 0.95 * args.fps,
        # growth is a rising line of pending frames; a falling one (warm-up draining) is not growth
        "no backlog growth (queue depth <= stream_backlog, pending slope < 1 frame/min)":
            measured["queue_depth_max"] <= backlog and measured["pending_slope_per_min"] < 1.0
            and measured["pending_max"] <= backlog + in_batches,
        "0 frames shed or refused": measured["dropped"] == 0 and measured["refused_overloaded"] == 0,
    }
    result = {
        "date_utc": date.isoformat(timespec="seconds"), "machine": machine, "pyav": av.__version__,
        "source": f"synthetic ultrasound {h}x{w} uint8, {cine.suffix} "
                  f"({'H.264' if cine.suffix == '.ts' else 'MJPEG'}), "
                  f"{args.fps} fps, looped", "model": args.model, "precision": precision, "spin_us": args.spin_us, "max_batch": args.max_batch,
        "stream_backlog": backlog, "measured": measured, "targets": targets,
    }
    tag = ((f"-{precision}" if args.precision else "") + (f"-spin{args.spin_us}" if args.spin_us is not None else "")
           + (f"-batch{args.max_batch}" if args.max_batch is not None else ""))
    stem = f"{date:%Y-%m-%d}-{machine['host'] or 'host'}-capture-timing{tag}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out_dir / f"{stem}.md").write_text(_markdown(result), encoding="utf-8")
    summary = {k: v for k, v in measured.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    for name, ok in targets.items():
        print(f"{'pass' if ok else 'FAIL'}: {name}")
    print(f"recorded: {args.out_dir / stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
