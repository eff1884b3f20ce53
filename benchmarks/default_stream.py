#!/usr/bin/env python3
"""The default configuration under a live probe stream (issue 15, "nothing else regresses").

``medge serve`` is started with no ``[[models]]`` table, so it serves every
engine in ``--engines-dir`` (the three bundled models) at the default
``precision = "auto"``, with DICOM on, exactly as a fresh install would.
Then one 30 fps stream of 480x640 uint8 ultrasound frames goes to
``us-lesion-seg`` for ``--seconds`` (paced by the sender, replies read
concurrently; :func:`daemon_overhead.stream`).

Printed and recorded: ready time, RSS at ready and peak RSS (VmHWM) with
all models loaded, the models and precisions served (from
``medge_model_info``), frames sent / answered / dropped, reply latency,
and the SIGTERM exit status. Targets: 0 drops, 0 errors, 0 unanswered;
peak RSS <= 300 MiB; exit status 0.

Results: ``benchmarks/results/<date>-<host>-default-stream.{json,md}``.

Usage::

    python benchmarks/default_stream.py              # the recorded run (60 s)
    python benchmarks/default_stream.py --seconds 5  # a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import daemon_overhead as do  # noqa: E402
from edge.inference.manifest import default_engines_dir  # noqa: E402

RSS_TARGET_MIB = 300
_INFO = re.compile(r'^medge_model_info\{([^}]*)\} 1\.0$', re.M)


def served_models(metrics_text: str) -> list[dict[str, str]]:
    """The ``medge_model_info`` label sets of a ``/metrics`` page (one per served model)."""
    out = []
    for labels in _INFO.findall(metrics_text):
        out.append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    return out


def verdicts(r: dict[str, Any]) -> list[tuple[str, bool]]:
    """The targets as (description, pass)."""
    live = r["stream_30fps"]
    peak_mib = r["rss_peak_bytes"] / 2**20
    return [
        (f"30 fps for {live['seconds']:.0f} s: {live['dropped']} dropped, {live['errors']} errors, "
         f"{live['unanswered']} unanswered (0 each)",
         live["dropped"] == 0 and live["errors"] == 0 and live["unanswered"] == 0),
        (f"peak RSS {peak_mib:.0f} MiB with {len(r['models'])} models <= {RSS_TARGET_MIB} MiB",
         peak_mib <= RSS_TARGET_MIB),
        (f"SIGTERM exit status {r['shutdown']['exit_code']} (0)", r["shutdown"]["exit_code"] == 0),
    ]


def markdown(r: dict[str, Any]) -> str:
    """The record as a results page."""
    m, live, lat = r["machine"], r["stream_30fps"], r["stream_30fps"]["latency"]
    lines = [
        f"# Default configuration under a 30 fps probe stream, {r['date_utc']}",
        "",
        f"Machine: {m['cpu_model']} ({m['cpu_usable']} cores), Python {m['versions']['python']}, "
        f"onnxruntime {m['versions'].get('onnxruntime')}; load average {m['loadavg'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end.",
        "",
        "`medge serve` with no `[[models]]` table (every bundled engine, `precision = \"auto\"`, DICOM on).",
        "",
        "| measure | value |",
        "| --- | --- |",
        "| models served | " + ", ".join(f"{x.get('model')} ({x.get('backend')}, {x.get('precision')})"
                                      for x in r["models"]) + " |",
        f"| ready | {r['ready_s']:.2f} s |",
        f"| RSS at ready / peak | {r['rss_ready_bytes'] / 2**20:.0f} / {r['rss_peak_bytes'] / 2**20:.0f} MiB |",
        f"| stream | {live['frames_sent']} frames of 480x640 uint8 at {live['fps']:.0f} fps to us-lesion-seg |",
        f"| replies | {live['replies']} (unanswered {live['unanswered']}) |",
        f"| latency p50 / p90 / p99 | {lat['p50_ms']:.1f} / {lat['p90_ms']:.1f} / {lat['p99_ms']:.1f} ms |",
        f"| SIGTERM | exit {r['shutdown']['exit_code']} in {r['shutdown']['seconds']:.2f} s |",
        "",
        "Targets:",
        "",
    ]
    lines += [f"- {t}: **{'pass' if ok else 'FAIL'}**" for t, ok in verdicts(r)]
    lines += ["", "Reproduce: `python benchmarks/default_stream.py`.", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the daemon at its defaults, stream, stop; return the record."""
    date = dt.datetime.now(dt.timezone.utc)
    machine = do._machine()
    machine["loadavg"] = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medge-default-") as tmp:
        daemon = do.Daemon(Path(tmp), args.engines_dir, dicom=True, precision=None, models=())
        try:
            ready_s = daemon.wait_ready()
            rss_ready = do._status_kb(daemon.proc.pid, "VmRSS") * 1024
            models = served_models(daemon.metrics())
            print(f"ready in {ready_s:.2f} s, RSS {rss_ready / 2**20:.0f} MiB; serving "
                  + ", ".join(f"{x.get('model')} ({x.get('precision')})" for x in models), flush=True)
            live = do.stream(daemon, args.seconds)
            rss_peak = do._status_kb(daemon.proc.pid, "VmHWM") * 1024
        finally:
            rc, stop_s = daemon.stop()
    machine["loadavg_end"] = os.getloadavg()
    return {
        "date_utc": date.isoformat(timespec="seconds"),
        "machine": machine,
        "ready_s": round(ready_s, 3),
        "rss_ready_bytes": rss_ready,
        "rss_peak_bytes": rss_peak,
        "models": models,
        "stream_30fps": live,
        "shutdown": {"exit_code": rc, "seconds": round(stop_s, 3)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines-dir", type=Path, default=default_engines_dir())
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the daemon
    t0 = time.perf_counter()
    record = run(args)
    record["targets"] = [{"target": t, "pass": ok} for t, ok in verdicts(record)]
    for t in record["targets"]:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}")
    stem = f"{record['date_utc'][:10]}-{record['machine']['host'] or 'host'}-default-stream"
    if args.seconds < 60:
        stem += "-quick"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (args.out_dir / f"{stem}.md").write_text(markdown(record), encoding="utf-8")
    print(f"wrote {args.out_dir / stem}.{{json,md}} in {time.perf_counter() - t0:.0f} s")
    return 0 if all(t["pass"] for t in record["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
