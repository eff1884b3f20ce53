#!/usr/bin/env python3
"""DICOM ingest throughput: our SCP vs a bare pynetdicom SCP vs DCMTK storescp.

Sends the same N CT instances (512 x 512, int16, Explicit VR Little Endian)
over ONE association with DCMTK ``/usr/bin/storescu`` to:

- ``ours``: :class:`edge.ingest.dicom.scp.DicomIngest` with inference disabled
  (service ``None``): header scan, routing, durable spool write (temp file,
  fsync, rename, fsync of the folder), success;
- ``bare``: a pynetdicom SCP whose C-STORE handler only writes the encoded
  bytes (file meta + data set) to a temp file, fsyncs, renames and answers
  success -- the floor of any pynetdicom-based design;
- ``storescp``: DCMTK ``/usr/bin/storescp`` writing to a folder.

Prints instances/s per receiver and the ratio ours/bare (target >= 0.80),
and writes a JSON + Markdown record to ``benchmarks/results/`` with the
machine and date. Receivers run in turns, ``--repeat`` times each; the
median is reported.

Usage::

    python benchmarks/dicom_ingest.py [--count 200] [--repeat 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from edge.fileio import atomic_write
from edge.tools.daemon_process import free_port
from edge.tools.results import machine_info
from edge.tools.synthetic_dicom import make_ct_series, save

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def make_ct_files(folder: Path, n: int, size: int = 512, seed: int = 0) -> list[Path]:
    """``n`` CT slices of ``size``x``size`` int16 in one series (:func:`edge.tools.synthetic_dicom.make_ct_series`)."""
    return [save(ds, folder / f"ct{i:04d}.dcm") for i, ds in enumerate(make_ct_series(n, size, seed))]


def send(port: int, files: list[Path], called: str) -> float:
    """Seconds for DCMTK storescu to send ``files`` over one association."""
    cmd = [STORESCU, "-aec", called, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-500:]}")
    return dt_s


def run_bare(files: list[Path], out: Path) -> float:
    """The baseline: encoded bytes, fsync, rename, success."""
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)

    def on_store(event):  # noqa: ANN001
        data = event.encoded_dataset()
        name = event.request.AffectedSOPInstanceUID
        atomic_write(out / f"{name}.dcm", data, tmp_dir=tmp, sync_dir=False)  # fsync, rename: no folder fsync
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        return send(server.server_address[1], files, "BARE")
    finally:
        server.shutdown()


def run_ours(files: list[Path], out: Path) -> float:
    """Our SCP with inference disabled (service None): scan, route, durable spool."""
    from edge.config import DicomRoute, default_config
    from edge.ingest.dicom.scp import DicomIngest

    cfg = default_config(check_models=False)
    cfg = dataclasses.replace(
        cfg, dicom=dataclasses.replace(cfg.dicom, port=0, routes=(DicomRoute(modality="CT", model="bench"),))
    )
    ing = DicomIngest(cfg, None, CollectorRegistry(), out).start()
    try:
        n0 = len(list((out / "dicom" / "instances").glob("*.dcm")))
        s = send(ing.port, files, cfg.dicom.ae_title)
        n1 = len(list((out / "dicom" / "instances").glob("*.dcm")))
        if n1 - n0 != len(files):
            raise RuntimeError(f"ours spooled {n1 - n0} of {len(files)} instances")
        return s
    finally:
        ing.close()


def run_storescp(files: list[Path], out: Path) -> float:
    """DCMTK storescp writing every instance to a folder."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-od", str(out), "-aet", "DCMTK", str(port)])
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        return send(port, files, "DCMTK")
    finally:
        proc.terminate()
        proc.wait(5)


def machine() -> dict[str, object]:
    """:func:`edge.tools.results.machine_info` plus the DCMTK version and the kernel."""
    dcmtk = subprocess.run([STORESCU, "--version"], capture_output=True, text=True).stdout.splitlines()[0:1]
    return {**machine_info(), "dcmtk": dcmtk[0] if dcmtk else "", "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="instances (default 200)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per receiver, taken in turns (default 3)")
    ap.add_argument("--skip-storescp", action="store_true", help="do not measure DCMTK storescp (slow)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--workdir", type=Path, default=None, help="where files and spools go (default: a temp dir)")
    args = ap.parse_args(argv)
    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            print(f"{tool} is missing: apt-get install dcmtk", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="medge-bench-", dir=args.workdir))
    try:
        (work / "files").mkdir()
        files = make_ct_files(work / "files", args.count)
        mb = sum(p.stat().st_size for p in files) / 1e6
        receivers = {"ours": run_ours, "bare": run_bare}
        if not args.skip_storescp:
            receivers["storescp"] = run_storescp
        times: dict[str, list[float]] = {k: [] for k in receivers}
        for r in range(args.repeat):
            for name, fn in receivers.items():
                out = work / f"{name}-{r}"
                out.mkdir()
                times[name].append(fn(files, out))
                shutil.rmtree(out, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: args.count / v for k, v in med.items()}
        ratio = rate["ours"] / rate["bare"]
        when = dt.datetime.now(dt.timezone.utc)
        record = {
            "benchmark": "dicom_ingest",
            "date_utc": when.isoformat(timespec="seconds"),
            "machine": machine(),
            "instances": args.count,
            "megabytes": round(mb, 1),
            "sender": "DCMTK storescu, one association",
            "repeat": args.repeat,
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "median_seconds": {k: round(v, 3) for k, v in med.items()},
            "instances_per_s": {k: round(v, 1) for k, v in rate.items()},
            "ratio_ours_over_bare": round(ratio, 3),
            "target_ratio": 0.80,
            "pass": ratio >= 0.80,
        }
        for k in receivers:
            print(f"{k:9s} {rate[k]:8.1f} instances/s  (median {med[k]:.2f} s of {times[k]})")
        print(f"ratio ours/bare = {ratio:.3f} (target >= 0.80): {'PASS' if ratio >= 0.80 else 'FAIL'}")
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = when.strftime("%Y%m%dT%H%M%SZ")
        (args.out / f"dicom_ingest-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "dicom_ingest-latest.json").write_text(json.dumps(record, indent=2) + "\n")
        return 0 if ratio >= 0.80 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
