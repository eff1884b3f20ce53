#!/usr/bin/env python3
"""The daemon's own targets (issue 3), measured in one run on this machine.

1. **Ready time and RSS**: ``medge serve`` (child process, bundled engines,
   DICOM on, free loopback ports) from spawn to ``/readyz`` 200; RSS then
   and the peak RSS (VmHWM) after all the traffic below.
2. **Floor**: the same comparison against a bare ZeroMQ echo server (ROUTER,
   one worker thread running the same backend, pipe wake-up; nothing else):
   what moving the frame and two thread hand-offs cost on this machine.
3. **Overhead at batch 1** (closed loop, loopback; simulated ultrasound /
   X-ray frames from :mod:`edge.tools.synthetic`): for each bundled model,
   alternating blocks (``--rounds``) of
   - *raw*: ``InferenceSession.run`` in this process on the same artifact
     and the same preprocessed tensor, with the daemon's session options
     (intra-op threads = cores, sequential, no spinning);
   - *e2e*: a DEALER sends one frame, waits for the reply, repeats;
   for two inputs: the model's native input (256x256 float32: pre/post-
   processing is trivial, so the difference is the serving layer: ZeroMQ,
   queueing, threads, encoding) and a 480x640 uint8 probe frame (raw then
   also includes our preprocessing and postprocessing, run in this process:
   ``LoadedModel.run``). Overhead = e2e − raw at p50 and p99.
   Targets: p50 <= 0.5 ms, p99 <= 2 ms.
4. **Live stream**: one 30 fps stream of 480x640 uint8 frames to
   ``us-lesion-seg`` for ``--stream-s`` seconds (default 60), paced by the
   sender, replies read concurrently: target zero drops and zero errors.

Results: ``benchmarks/results/<date>-<host>-daemon-overhead.{json,md}``
(machine, library versions and load average recorded: shared machines are
noisy; compare ratios taken in one run).

Usage::

    python benchmarks/daemon_overhead.py                 # the full run (~3 min)
    python benchmarks/daemon_overhead.py --quick         # smoke run (~30 s)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.inference.manifest import default_engines_dir  # noqa: E402
from edge.inference.model import load_model  # noqa: E402
from edge.tools.daemon_process import free_port  # noqa: E402
from edge.tools.results import machine_info  # noqa: E402
from edge.tools.synthetic import make_source  # noqa: E402

MODELS = ("us-lesion-seg", "xray-nodule-det")
SPIN_US = 1000  # [[models]] spin_us of the daemon, and the raw side's: set by --spin-us


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(_pct(ms, 50), 4),
        "p90_ms": round(_pct(ms, 90), 4),
        "p99_ms": round(_pct(ms, 99), 4),
        "mean_ms": round(float(np.mean(ms)), 4) if ms else float("nan"),
    }


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _machine() -> dict[str, Any]:
    """:func:`edge.tools.results.machine_info` plus host name and load average."""
    return {**machine_info(), "host": platform.node(), "loadavg_start": os.getloadavg()}


class Daemon:
    """``medge serve`` as a child process on free ports."""

    def __init__(self, workdir: Path, engines_dir: Path, dicom: bool = True, precision: str | None = None,
                 models: tuple[str, ...] | None = None) -> None:
        """``models``: the ``[[models]]`` tables to write (default :data:`MODELS`; ``()``: none, so the
        daemon serves every engine in ``engines_dir`` with its defaults)."""
        self.ingest = f"tcp://127.0.0.1:{free_port()}"
        self.publish = f"tcp://127.0.0.1:{free_port()}"
        self.http = f"http://127.0.0.1:{free_port()}"
        cfg = workdir / "medge.toml"
        cfg.write_text(
            f'engines_dir = "{engines_dir}"\nspool_dir = "{workdir / "spool"}"\n'
            f'[zmq]\ningest = "{self.ingest}"\npublish = "{self.publish}"\n'
            f'[metrics]\nport = {self.http.rsplit(":", 1)[1]}\n'
            f"[dicom]\nenabled = {'true' if dicom else 'false'}\nport = {free_port()}\n"
            + "".join(
                f'[[models]]\nname = "{m}"\nspin_us = {SPIN_US}\n' + (f'precision = "{precision}"\n' if precision else "")
                for m in (MODELS if models is None else models)
            ),
            encoding="utf-8",
        )
        self.log = open(workdir / "serve.log", "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "--log-level", "WARNING", "serve", "--config", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def wait_ready(self, timeout: float = 60.0) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"medge serve exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.http + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("medge serve did not become ready")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.http + "/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> tuple[int, float]:
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc, time.perf_counter() - t


def _request(i: int, img: np.ndarray, model: str, stream: str = "bench") -> list[Any]:
    hdr = {"v": 1, "id": i, "model": model, "stream": stream, "dtype": str(img.dtype), "shape": list(img.shape)}
    return [json.dumps(hdr).encode(), img]


def _e2e_block(
    sock: zmq.Socket, img: np.ndarray, model: str, n: int, start_id: int, stages: dict[str, list[int]] | None = None
) -> list[float]:
    out = []
    for k in range(n):
        t = time.perf_counter_ns()
        sock.send_multipart(_request(start_id + k, img, model), copy=False)
        frames = sock.recv_multipart()
        e2e_ns = time.perf_counter_ns() - t
        out.append(e2e_ns / 1e6)
        hdr = json.loads(frames[0])
        if hdr["status"] != "ok":
            raise RuntimeError(f"reply not ok: {hdr}")
        if stages is not None:
            for key, us in hdr["timing_us"].items():
                stages.setdefault(key, []).append(int(us))
            # client-measured time outside the daemon's receipt-to-result span: ZeroMQ both ways,
            # the result hand-off to the I/O thread, reply encoding
            stages.setdefault("transport", []).append(e2e_ns // 1000 - int(hdr["timing_us"]["total"]))
    return out


def overhead(daemon: Daemon, engines_dir: Path, rounds: int, block: int, warmup: int) -> list[dict[str, Any]]:
    """Alternate raw and e2e blocks per model and input; return one row per (model, input)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(daemon.ingest)
    rows = []
    try:
        for name in MODELS:
            model = load_model(name, engines_dir=engines_dir, max_batch=1, spin_us=SPIN_US)  # the daemon's session options
            # realistic frames (the simulator the demo uses): random noise would make the
            # detector's post-processing decode hundreds of spurious peaks
            h, w = model.manifest.input.size
            kind = "xray" if model.task == "detection" else "ultrasound"
            native = make_source(kind, h, w, "float32", seed=0, loop=1).frame(0)
            probe = make_source(kind, 480, 640, "uint8", seed=0, loop=1).frame(0)
            for label, img in (("256x256 float32 (model input)", native), ("480x640 uint8 (probe frame)", probe)):
                x, _ = model.preprocess(img)
                batch = x[None]
                full = label.startswith("480")
                raw_fn = (lambda: model.run([img])) if full else (lambda: model.backend.infer(batch))
                raw_ms: list[float] = []
                e2e_ms: list[float] = []
                stages: dict[str, list[int]] = {}
                for _ in range(warmup):
                    raw_fn()
                _e2e_block(sock, img, name, warmup, 0)
                for r in range(rounds):
                    for _ in range(block):
                        t = time.perf_counter_ns()
                        raw_fn()
                        raw_ms.append((time.perf_counter_ns() - t) / 1e6)
                    e2e_ms += _e2e_block(sock, img, name, block, r * block, stages)
                raw, e2e = _summary(raw_ms), _summary(e2e_ms)
                rows.append(
                    {
                        "model": name,
                        "precision": model.precision,
                        "input": label,
                        "raw_is": "preprocess + ORT + postprocess in-process" if full else "ORT session.run only",
                        "raw": raw,
                        "e2e": e2e,
                        "overhead_p50_ms": round(e2e["p50_ms"] - raw["p50_ms"], 4),
                        "overhead_p99_ms": round(e2e["p99_ms"] - raw["p99_ms"], 4),
                        "server_stages_p50_us": {k: int(np.median(v)) for k, v in stages.items()},
                    }
                )
                print(
                    f"  {name:<16} {label:<30} raw p50 {raw['p50_ms']:.3f} p99 {raw['p99_ms']:.3f} | "
                    f"e2e p50 {e2e['p50_ms']:.3f} p99 {e2e['p99_ms']:.3f} | "
                    f"overhead p50 {rows[-1]['overhead_p50_ms']:+.3f} p99 {rows[-1]['overhead_p99_ms']:+.3f} ms",
                    flush=True,
                )
            model.close()
    finally:
        sock.close(linger=0)
        ctx.term()
    return rows


def stream(daemon: Daemon, seconds: float, fps: float = 30.0) -> dict[str, Any]:
    """One paced live stream; replies read by a second thread on the same socket's poller."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(daemon.ingest)
    src = make_source("ultrasound", 480, 640, "uint8", seed=1, loop=8)
    frames = [src.frame(k) for k in range(8)]
    sent: dict[int, int] = {}
    lat: list[float] = []
    status: dict[str, int] = {}
    n_total = int(seconds * fps)
    period_ns = int(1e9 / fps)
    t0 = time.perf_counter_ns()
    i = 0
    late_sends = 0
    while i < n_total or len(lat) + sum(v for k, v in status.items() if k != "ok") < n_total:
        now = time.perf_counter_ns()
        if i < n_total and now >= t0 + i * period_ns:
            if now > t0 + i * period_ns + period_ns:
                late_sends += 1
            sent[i] = now
            sock.send_multipart(_request(i, frames[i % 8], "us-lesion-seg", stream="probe-30fps"), copy=False)
            i += 1
            continue
        wait_ms = max(0, (t0 + i * period_ns - now) // 1_000_000) if i < n_total else 1000
        if sock.poll(min(wait_ms, 1000) if i < n_total else 1000):
            msg = sock.recv_multipart()
            hdr = json.loads(msg[0])
            status[hdr["status"]] = status.get(hdr["status"], 0) + 1
            if hdr["status"] == "ok":
                lat.append((time.perf_counter_ns() - sent[hdr["id"]]) / 1e6)
        elif i >= n_total:
            break  # nothing for a second after the last send
    sock.close(linger=0)
    ctx.term()
    return {
        "fps": fps,
        "seconds": seconds,
        "frames_sent": i,
        "replies": status,
        "dropped": status.get("dropped", 0),
        "errors": status.get("error", 0),
        "unanswered": i - sum(status.values()),
        "late_sends": late_sends,
        "latency": _summary(lat),
    }


def echo_server(endpoint: str, model_name: str, engines_dir: Path) -> None:
    """The floor of any ZeroMQ server here: one thread, recv -> backend -> send, nothing else.

    No second thread, no parsing, no pre/post-processing, metrics or PUB. The pixels
    are received and ignored; the backend runs on a fixed preprocessed tensor (what
    *raw* measures, same session options as the daemon) and the reply is a small header
    plus, when the request carried a full frame, a 256x256 uint8 "mask" (the size of the
    segmentation reply). A one-byte request gets a one-byte reply.
    """
    model = load_model(model_name, engines_dir=engines_dir, max_batch=1, spin_us=SPIN_US)
    h, w = model.manifest.input.size
    x = model.preprocess(np.zeros((h, w), np.float32))[0][None]
    mask = np.zeros((h, w), np.uint8)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    while True:
        frames = router.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            break
        model.backend.infer(x)
        if len(frames[-1]) > 1:
            router.send_multipart([frames[0], b'{"v":1,"status":"ok"}', mask])
        else:
            router.send_multipart([frames[0], b"k"])
    router.close(linger=0)
    ctx.term()


def floor(engines_dir: Path, rounds: int, block: int, warmup: int) -> list[dict[str, Any]]:
    """raw vs the one-thread echo server (``echo_server``): the 256x256 frame, then one byte."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    name = MODELS[0]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--spin-us", str(SPIN_US), "--echo-server", endpoint, name, str(engines_dir)]
    )
    rows = []
    try:
        model = load_model(name, engines_dir=engines_dir, max_batch=1, spin_us=SPIN_US)
        h, w = model.manifest.input.size
        img = make_source("ultrasound", h, w, "float32", seed=0, loop=1).frame(0)
        batch = model.preprocess(img)[0][None]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)
        sock.connect(endpoint)
        hdr = json.dumps({"v": 1, "dtype": "float32", "shape": [h, w]}).encode()
        payloads = (
            ("256x256 float32 frame in, 64 KB mask out", [hdr, img]),
            ("1 byte in, 1 byte out", [b"1"]),
        )
        for label, msg in payloads:
            raw_ms: list[float] = []
            e2e_ms: list[float] = []
            for r in range(-1, rounds):  # round -1 is the warm-up; then blocks alternate as for the daemon
                n = warmup if r < 0 else block
                for _ in range(n):
                    t = time.perf_counter_ns()
                    model.backend.infer(batch)
                    if r >= 0:
                        raw_ms.append((time.perf_counter_ns() - t) / 1e6)
                for _ in range(n):
                    t = time.perf_counter_ns()
                    sock.send_multipart(msg, copy=False)
                    sock.recv_multipart()
                    if r >= 0:
                        e2e_ms.append((time.perf_counter_ns() - t) / 1e6)
            raw, e2e = _summary(raw_ms), _summary(e2e_ms)
            rows.append(
                {
                    "model": name,
                    "payload": label,
                    "server": "one thread: recv -> the same ONNX Runtime session -> send; nothing else",
                    "raw": raw,
                    "e2e": e2e,
                    "overhead_p50_ms": round(e2e["p50_ms"] - raw["p50_ms"], 4),
                    "overhead_p99_ms": round(e2e["p99_ms"] - raw["p99_ms"], 4),
                }
            )
            print(
                f"  floor ({label}): one-thread ZeroMQ echo + {name}: overhead p50 "
                f"{rows[-1]['overhead_p50_ms']:+.3f} p99 {rows[-1]['overhead_p99_ms']:+.3f} ms",
                flush=True,
            )
        sock.send_multipart([b"stop", b""])
        sock.close(linger=100)
        ctx.term()
        model.close()
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def main(argv: list[str] | None = None) -> int:
    global SPIN_US
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines-dir", type=Path, default=default_engines_dir())
    ap.add_argument("--rounds", type=int, default=150, help="raw/e2e alternations per model and input")
    ap.add_argument("--block", type=int, default=10, help="iterations per block (small: both sides see the same load)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--stream-s", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="short smoke run (not for the record)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--spin-us", type=int, default=SPIN_US,
                    help="[[models]] spin_us for the daemon and the raw side (default 1000; 0: no spinning)")
    ap.add_argument("--echo-server", nargs=3, metavar=("ENDPOINT", "MODEL", "ENGINES_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    SPIN_US = args.spin_us
    if args.echo_server:
        echo_server(args.echo_server[0], args.echo_server[1], Path(args.echo_server[2]))
        return 0
    if args.quick:
        args.rounds, args.block, args.warmup, args.stream_s = 10, 10, 10, 5.0
    # a SIGTERM (timeout, CI) must still stop the daemon child: run the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = _machine()
    date = dt.datetime.now(dt.timezone.utc)
    result: dict[str, Any] = {
        "date_utc": date.isoformat(timespec="seconds"),
        "machine": machine,
        "quick": args.quick,
        "spin_us": SPIN_US,
    }
    with tempfile.TemporaryDirectory(prefix="medge-overhead-") as tmp:
        daemon = Daemon(Path(tmp), args.engines_dir, dicom=True, precision="fp32")  # the raw side runs fp32 too
        try:
            ready_s = daemon.wait_ready()
            time.sleep(0.5)
            rss_ready = _status_kb(daemon.proc.pid, "VmRSS") * 1024
            print(f"ready in {ready_s:.2f} s, RSS {rss_ready / 2**20:.0f} MiB (both models, DICOM on)", flush=True)
            print("overhead at batch 1 (closed loop):", flush=True)
            rows = overhead(daemon, args.engines_dir, args.rounds, args.block, args.warmup)
            floor_rows = floor(args.engines_dir, args.rounds, args.block, args.warmup)
            print(f"30 fps stream of 480x640 for {args.stream_s:.0f} s ...", flush=True)
            live = stream(daemon, args.stream_s)
            print(
                f"  sent {live['frames_sent']}, replies {live['replies']}, unanswered {live['unanswered']}, "
                f"latency p50 {live['latency']['p50_ms']:.2f} p99 {live['latency']['p99_ms']:.2f} ms",
                flush=True,
            )
            rss_peak = _status_kb(daemon.proc.pid, "VmHWM") * 1024
            rss_end = _status_kb(daemon.proc.pid, "VmRSS") * 1024
        finally:
            rc, stop_s = daemon.stop()
    machine["loadavg_end"] = os.getloadavg()
    result.update(
        {
            "ready_s": round(ready_s, 3),
            "rss_ready_bytes": rss_ready,
            "rss_end_bytes": rss_end,
            "rss_peak_bytes": rss_peak,
            "overhead": rows,
            "floor_one_thread_zmq_echo": floor_rows,
            "stream_30fps": live,
            "shutdown": {"exit_code": rc, "seconds": round(stop_s, 3)},
        }
    )
    seg_row = next(r for r in rows if r["model"] == MODELS[0] and "model input" in r["input"])
    worst50 = max(r["overhead_p50_ms"] for r in rows if "model input" in r["input"])
    worst99 = max(r["overhead_p99_ms"] for r in rows if "model input" in r["input"])
    targets = {
        "overhead_p50_le_0.5ms (model input)": worst50 <= 0.5,
        "overhead_p99_le_2ms (model input)": worst99 <= 2.0,
        "stream_30fps_zero_drops": live["dropped"] == 0 and live["errors"] == 0 and live["unanswered"] == 0,
        "rss_le_400MB": rss_peak <= 400 * 10**6,
        "ready_le_5s": ready_s <= 5.0,
        "sigterm_exit_0": rc == 0,
    }
    result["targets"] = targets
    tag = ("-quick" if args.quick else "") + (f"-spin{SPIN_US}" if SPIN_US != 1000 else "")
    stem = f"{date:%Y-%m-%d}-{machine['host'] or 'host'}-daemon-overhead{tag}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = [
        f"# Daemon overhead and live-stream run, {result['date_utc']}",
        "",
        f"Machine: {machine['cpu_model']} ({machine['cpu_usable']} cores), Python {machine['versions']['python']}, "
        f"onnxruntime {machine['versions'].get('onnxruntime')}, pyzmq {machine['versions'].get('pyzmq')}; "
        f"load average {machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end "
        f"(shared machine: compare ratios within this run). ONNX Runtime spin_us = {SPIN_US} on both sides.",
        "",
        f"- ready in **{ready_s:.2f} s**; RSS with both bundled models and DICOM on: "
        f"**{rss_ready / 2**20:.0f} MiB** at ready, peak **{rss_peak / 2**20:.0f} MiB** after the runs below",
        f"- SIGTERM: exit {rc} in {stop_s:.2f} s",
        "",
        f"## Overhead at batch 1 (closed loop, loopback; raw and e2e alternate in blocks of {args.block}, {args.rounds} rounds)",
        "",
        "| model | precision | input | raw p50 / p99 ms | e2e p50 / p99 ms | overhead p50 / p99 ms | raw is | median µs: queue / pre / infer / post / transport |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        md.append(
            f"| {r['model']} | {r['precision']} | {r['input']} | {r['raw']['p50_ms']:.3f} / {r['raw']['p99_ms']:.3f} | "
            f"{r['e2e']['p50_ms']:.3f} / {r['e2e']['p99_ms']:.3f} | **{r['overhead_p50_ms']:+.3f} / "
            f"{r['overhead_p99_ms']:+.3f}** | {r['raw_is']} | "
            + " / ".join(str(r["server_stages_p50_us"].get(k, "")) for k in ("queue", "preprocess", "infer", "postprocess", "transport"))
            + " |"
        )
    md += [
        "",
        "Floor of any ZeroMQ server on this machine, measured the same way (raw and e2e alternating, "
        f"{MODELS[0]}): a one-thread ROUTER that receives, runs the same ONNX Runtime session and "
        "replies, with no second thread, parsing, pre/post-processing, metrics or PUB:",
        "",
        "| payload | overhead p50 / p99 ms |",
        "| --- | --- |",
        *[
            f"| {f['payload']} | **{f['overhead_p50_ms']:+.3f} / {f['overhead_p99_ms']:+.3f}** |"
            for f in floor_rows
        ],
        "",
        f"The daemon's own share (us-lesion-seg, model input, p50): "
        f"{seg_row['overhead_p50_ms'] - floor_rows[0]['overhead_p50_ms']:+.3f} ms above the one-thread floor "
        "with the same payload.",
        "",
        f"## One 30 fps stream of 480x640 uint8 to us-lesion-seg for {live['seconds']:.0f} s",
        "",
        f"sent {live['frames_sent']}, replies {live['replies']}, dropped **{live['dropped']}**, errors "
        f"{live['errors']}, unanswered {live['unanswered']}; latency p50 {live['latency']['p50_ms']:.2f} ms, "
        f"p99 {live['latency']['p99_ms']:.2f} ms.",
        "",
        "## Targets",
        "",
        *[f"- {k}: {'met' if v else '**NOT met**'}" for k, v in targets.items()],
        "",
        f"Reproduce: `python benchmarks/daemon_overhead.py{' --quick' if args.quick else ''}`.",
        "",
    ]
    (args.out_dir / f"{stem}.md").write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {args.out_dir / (stem + '.json')} and .md")
    for k, v in targets.items():
        print(f"  {k}: {'met' if v else 'NOT met'}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
