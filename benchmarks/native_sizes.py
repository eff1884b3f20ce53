#!/usr/bin/env python3
"""The daemon's cost at model size and at the sizes scanners send (issue 15), from one run.

For each bundled model and two inputs, the model's own size (256x256
float32) and its native source size (480x640 uint8 ultrasound for the
segmenter, 512x512 uint16 radiograph for the detector), blocks alternate
(``--rounds`` rounds of ``--block`` requests, closed loop, batch 1):

- *raw*: the model's ONNX Runtime session (``backend.infer``, the daemon's
  session options) on the preprocessed tensor, in this process;
- *daemon*: a DEALER sends the frame to ``medge serve`` (child process,
  loopback) and waits for the reply: parsing, queue, preprocessing,
  inference, postprocessing, the reply (a mask at the source size for the
  segmenter, boxes for the detector);
- *floor*: the same frame to a one-thread ZeroMQ echo server (a child
  process) that runs the same session on a fixed tensor and replies like the
  daemon does (a uint8 mask of the source size for the segmenter, a short
  header for the detector): what any ZeroMQ server pays on this machine;
- *peers* (optional): other servers measured in the same blocks, e.g.
  Triton through :mod:`triton_peer` (``--triton``).

Printed per model and input: daemon − raw and floor − raw at p50 / p99,
the daemon's own share (daemon − floor, p50), the daemon's median
preprocess / postprocess times, then the targets as PASS / FAIL lines:
share <= 0.3 ms p50 at model size; daemon − raw <= 1.0 ms p50 at native
size; daemon − raw p99 <= 2 ms everywhere. A shared machine is noisy:
compare numbers taken in one run.

Results: ``benchmarks/results/<date>-<host>-native-sizes[-quick].json``.

Usage::

    python benchmarks/native_sizes.py --quick      # smoke run (~1 min)
    python benchmarks/native_sizes.py              # the recorded run (150 rounds of 10)
    python benchmarks/native_sizes.py --triton     # with Triton beside it (see triton_peer.py)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import daemon_overhead as do  # noqa: E402
from edge.inference.manifest import default_engines_dir  # noqa: E402
from edge.inference.model import load_model  # noqa: E402
from edge.tools.daemon_process import free_port  # noqa: E402
from edge.tools.synthetic import make_source  # noqa: E402

MODELS = ("us-lesion-seg", "xray-nodule-det", "xray-nodule-cls")  # every bundled model
#: Per task: the source a scanner sends (kind of synthetic frame, height, width, dtype).
NATIVE = {
    "segmentation": ("ultrasound", 480, 640, "uint8"),
    "detection": ("xray", 512, 512, "uint16"),
    "classification": ("xray", 512, 512, "uint16"),
}
TARGET_SHARE_P50_MS = 0.3
TARGET_NATIVE_P50_MS = 1.0
TARGET_P99_MS = 2.0

#: A peer measures ``n`` round trips of one case and returns their times in ms (``None``: not for this case).
Peer = Callable[["Case", int], "list[float] | None"]


@dataclass
class Case:
    """One model and one input frame, with its preprocessed tensor."""

    model: str
    task: str
    label: str
    image: np.ndarray
    batch: np.ndarray
    native: bool
    samples: dict[str, list[float]] = field(default_factory=dict)
    stages: dict[str, list[int]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the floor
def echo_server(endpoint: str, model_name: str, engines_dir: Path, precision: str = "fp32") -> None:
    """One thread: recv -> the model's session on a fixed tensor -> a reply shaped like the daemon's.

    A request is ``[header, pixels]`` (the daemon's protocol; the header is
    not parsed). Segmentation: the reply carries a uint8 mask of the frame's
    pixel count (looked up by size, no parsing); detection: a short header.
    ``b"stop"`` ends it.
    """
    model = load_model(model_name, engines_dir=engines_dir, max_batch=1, spin_us=do.SPIN_US, precision=precision)
    h, w = model.manifest.input.size
    x = model.preprocess(np.zeros((h, w), np.float32))[0][None]
    masks: dict[int, np.ndarray] = {}
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    try:
        while True:
            frames = router.recv_multipart(copy=False)
            if frames[1].bytes == b"stop":
                break
            model.backend.infer(x)
            if model.task != "segmentation":
                router.send_multipart([frames[0], b'{"v":1,"status":"ok","boxes":[]}'])
                continue
            n = len(frames[-1])
            mask = masks.get(n)
            if mask is None:
                mask = masks.setdefault(n, np.zeros(n // max(1, _itemsize(frames[1].bytes)), np.uint8))
            router.send_multipart([frames[0], b'{"v":1,"status":"ok"}', mask], copy=False)
    finally:
        router.close(linger=0)
        ctx.term()
        model.close()


def _itemsize(header: bytes) -> int:
    """Bytes per pixel from a request header (read once per frame size, when its mask is made)."""
    return int(np.dtype(json.loads(header)["dtype"]).itemsize)


class EchoPeer:
    """The floor: :func:`echo_server` for each model in child processes, one DEALER each."""

    def __init__(self, engines_dir: Path, models: tuple[str, ...], precision: str) -> None:
        self.ctx = zmq.Context()
        self.procs: list[subprocess.Popen] = []
        self.socks: dict[str, zmq.Socket] = {}
        for name in models:
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, "--spin-us", str(do.SPIN_US), "--precision", precision,
                 "--echo-server", endpoint, name, str(engines_dir)]
            ))
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVTIMEO, 60_000)
            sock.connect(endpoint)
            self.socks[name] = sock

    def __call__(self, case: Case, n: int) -> list[float]:
        sock, out = self.socks[case.model], []
        for i in range(n):
            t = time.perf_counter_ns()
            sock.send_multipart(do._request(i, case.image, case.model), copy=False)
            sock.recv_multipart()
            out.append((time.perf_counter_ns() - t) / 1e6)
        return out

    def close(self) -> None:
        for sock in self.socks.values():
            sock.send_multipart([b"stop", b""])
            sock.close(linger=200)
        self.ctx.term()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


# ----------------------------------------------------------------------------- measurement
def make_cases(engines_dir: Path) -> list[Case]:
    """Model size and native size for every bundled model (the same frames as daemon_overhead.py)."""
    cases = []
    for name in MODELS:
        with load_model(name, engines_dir=engines_dir, max_batch=1) as model:
            h, w = model.manifest.input.size
            kind, nh, nw, ndt = NATIVE[model.task]
            for label, img, native in (
                (f"{h}x{w} float32 (model size)", make_source(kind, h, w, "float32", seed=0, loop=1).frame(0), False),
                (f"{nh}x{nw} {ndt} (native)", make_source(kind, nh, nw, ndt, seed=0, loop=1).frame(0), True),
            ):
                x, _ = model.preprocess(img)
                cases.append(Case(name, model.task, label, img, np.ascontiguousarray(x[None]), native))
    return cases


def measure(cases: list[Case], daemon_endpoint: str, engines_dir: Path, peers: dict[str, Peer],
            rounds: int, block: int, warmup: int, precision: str = "fp32") -> None:
    """Fill each case's samples: raw, daemon and every peer, alternating blocks of ``block``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    sock.connect(daemon_endpoint)
    models = {
        name: load_model(name, engines_dir=engines_dir, max_batch=1, spin_us=do.SPIN_US, precision=precision)
        for name in MODELS
    }
    try:
        for case in cases:
            backend = models[case.model].backend
            for r in range(-1, rounds):  # round -1 is the warm-up
                n = warmup if r < 0 else block
                raw = []
                for _ in range(n):
                    t = time.perf_counter_ns()
                    backend.infer(case.batch)
                    raw.append((time.perf_counter_ns() - t) / 1e6)
                stages = case.stages if r >= 0 else None
                e2e = do._e2e_block(sock, case.image, case.model, n, (r + 1) * n, stages)
                got = {"raw": raw, "daemon": e2e, **{k: peer(case, n) for k, peer in peers.items()}}
                if r >= 0:
                    for k, v in got.items():
                        if v is not None:
                            case.samples.setdefault(k, []).extend(v)
            print(f"  measured {case.model} {case.label}", flush=True)
    finally:
        sock.close(linger=0)
        ctx.term()
        for m in models.values():
            m.close()


def summarise(case: Case) -> dict[str, Any]:
    """p50 / p99 of each server, its overhead over raw, and the daemon's share over the floor."""
    q = {k: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for k, v in case.samples.items() if v}
    raw50, raw99 = q["raw"]
    over = {k: {"p50_ms": round(v[0] - raw50, 4), "p99_ms": round(v[1] - raw99, 4)} for k, v in q.items() if k != "raw"}
    row: dict[str, Any] = {
        "model": case.model,
        "input": case.label,
        "native": case.native,
        "n": len(case.samples["raw"]),
        "p50_p99_ms": {k: [round(a, 4), round(b, 4)] for k, (a, b) in q.items()},
        "overhead_over_raw_ms": over,
        "daemon_stages_p50_us": {k: int(np.median(v)) for k, v in case.stages.items()},
    }
    if "floor" in over:
        row["daemon_share_over_floor_p50_ms"] = round(over["daemon"]["p50_ms"] - over["floor"]["p50_ms"], 4)
    return row


def verdicts(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The issue's targets, one line each."""
    out = []
    for r in rows:
        d = r["overhead_over_raw_ms"]["daemon"]
        tag = f"{r['model']} {r['input']}"
        if not r["native"] and "daemon_share_over_floor_p50_ms" in r:
            share = r["daemon_share_over_floor_p50_ms"]
            out.append((f"{tag}: daemon share over the floor {share:+.3f} ms p50 <= {TARGET_SHARE_P50_MS}", share <= TARGET_SHARE_P50_MS))
        if r["native"]:
            out.append((f"{tag}: daemon - raw {d['p50_ms']:+.3f} ms p50 <= {TARGET_NATIVE_P50_MS}", d["p50_ms"] <= TARGET_NATIVE_P50_MS))
        out.append((f"{tag}: daemon - raw {d['p99_ms']:+.3f} ms p99 <= {TARGET_P99_MS}", d["p99_ms"] <= TARGET_P99_MS))
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per model and input, overheads in ms over raw ONNX Runtime."""
    for r in rows:
        o = r["overhead_over_raw_ms"]
        raw50, raw99 = r["p50_p99_ms"]["raw"]
        parts = [f"{k} {v['p50_ms']:+.3f}/{v['p99_ms']:+.3f}" for k, v in o.items()]
        st = r["daemon_stages_p50_us"]
        print(f"  {r['model']:<16} {r['input']:<28} raw {raw50:.3f}/{raw99:.3f} | over raw p50/p99: " + ", ".join(parts)
              + (f" | share {r['daemon_share_over_floor_p50_ms']:+.3f}" if "daemon_share_over_floor_p50_ms" in r else "")
              + f" | daemon pre/post {st.get('preprocess', '-')}/{st.get('postprocess', '-')} us", flush=True)


def markdown(ns: dict[str, Any]) -> list[str]:
    """A Markdown section of one run's record (``make bench``'s section 8): overheads, then the targets."""
    peers = sorted({k for r in ns["rows"] for k in r["overhead_over_raw_ms"]} - {"daemon", "floor"})
    lines = ["", "## 8. Model size and native sizes (`benchmarks/native_sizes.py`)", "",
             f"Closed loop, batch 1, {ns['precision']}; raw ONNX Runtime, the daemon, a one-thread ZeroMQ echo server "
             "(the floor: same session, a reply shaped like the daemon's)" + (", " + ", ".join(peers) if peers else "")
             + f" alternating in blocks of {ns['block']} for {ns['rounds']} rounds. Overheads over raw, p50 / p99 ms.", "",
             "| model | input | raw p50 | daemon | floor | daemon share (p50) | " + "".join(f"{p} | " for p in peers)
             + "daemon pre / post µs |",
             "| --- | --- | --- | --- | --- | --- | " + "--- | " * len(peers) + "--- |"]
    for r in ns["rows"]:
        o, st = r["overhead_over_raw_ms"], r["daemon_stages_p50_us"]

        def cell(k: str) -> str:
            return f"{o[k]['p50_ms']:+.3f} / {o[k]['p99_ms']:+.3f}" if k in o else "-"

        lines.append(f"| {r['model']} | {r['input']} | {r['p50_p99_ms']['raw'][0]:.3f} | {cell('daemon')} | "
                     f"{cell('floor')} | {_ms(r.get('daemon_share_over_floor_p50_ms'))} | "
                     + "".join(f"{cell(p)} | " for p in peers)
                     + f"{st.get('preprocess', '-')} / {st.get('postprocess', '-')} |")
    lines += ["", *[f"- {'PASS' if t['pass'] else '**FAIL**'}: {t['target']}" for t in ns["targets"]]]
    return lines


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"


# ----------------------------------------------------------------------------- entry
def run(args: argparse.Namespace, extra_peers: dict[str, Peer] | None = None) -> dict[str, Any]:
    """The whole run: daemon, floor (and peers), measurement, table, targets; returns the record."""
    date = dt.datetime.now(dt.timezone.utc)
    record: dict[str, Any] = {"date_utc": date.isoformat(timespec="seconds"), "machine": do._machine(),
                              "quick": args.quick, "spin_us": do.SPIN_US, "precision": args.precision,
                              "rounds": args.rounds, "block": args.block}
    cases = make_cases(args.engines_dir)
    with tempfile.TemporaryDirectory(prefix="medge-native-") as tmp:
        daemon = do.Daemon(Path(tmp), args.engines_dir, dicom=False, precision=args.precision, models=MODELS)
        echo = None
        try:
            daemon.wait_ready()
            echo = EchoPeer(args.engines_dir, MODELS, args.precision)
            measure(cases, daemon.ingest, args.engines_dir, {"floor": echo, **(extra_peers or {})},
                    args.rounds, args.block, args.warmup, args.precision)
        finally:
            if echo is not None:
                echo.close()
            rc, _ = daemon.stop()
    rows = [summarise(c) for c in cases]
    record.update(rows=rows, daemon_exit_status=rc, targets=[{"target": t, "pass": ok} for t, ok in verdicts(rows)])
    record["machine"]["loadavg_end"] = os.getloadavg()
    print("overhead over raw ONNX Runtime, p50/p99 ms (daemon, floor = one-thread ZeroMQ echo"
          + (", " + ", ".join(extra_peers) if extra_peers else "") + "):")
    print_table(rows)
    print("targets:")
    for t in record["targets"]:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}")
    stem = (f"{date:%Y-%m-%d}-{record['machine']['host'] or 'host'}-native-sizes-{args.precision}"
            + ("-triton" if extra_peers else "") + ("-quick" if args.quick else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out_dir / (stem + '.json')}")
    return record


def parser() -> argparse.ArgumentParser:
    """Command-line options (shared with triton_peer.py)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines-dir", type=Path, default=default_engines_dir())
    ap.add_argument("--rounds", type=int, default=150, help="alternations per model and input")
    ap.add_argument("--block", type=int, default=10, help="requests per block")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="10 rounds of 5 (a smoke run, not for the record)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--spin-us", type=int, default=do.SPIN_US, help="ONNX Runtime spin_us on every side")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="the artifact every side runs")
    ap.add_argument("--triton", action="store_true", help="add Triton (PyTriton) beside the daemon: see triton_peer.py")
    ap.add_argument("--echo-server", nargs=3, metavar=("ENDPOINT", "MODEL", "ENGINES_DIR"), help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    do.SPIN_US = args.spin_us
    if args.echo_server:
        echo_server(args.echo_server[0], args.echo_server[1], Path(args.echo_server[2]), args.precision)
        return 0
    if args.quick:
        args.rounds, args.block, args.warmup = 10, 5, 10
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the children
    if args.triton:
        import triton_peer

        return triton_peer.run_beside(args)
    record = run(args)
    return 0 if record["daemon_exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
