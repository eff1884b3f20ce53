"""``medge bench dicom``: C-STORE throughput and store-to-result latency.

Pieces (also used by ``medge demo``):

- :func:`edge.tools.synthetic_dicom.synthetic_instances` (``--synthetic N``):
  ultrasound (US) or X-ray (DX) instances made from :mod:`edge.tools.synthetic`
  frames, with new UIDs and obviously synthetic patient attributes (no real
  identifiers);
- :func:`load_instances`: DICOM files of a folder (``--files``).
- :class:`ResultCatcher`: a local storage SCP on a loopback port standing in
  for the PACS; it records when each result (SEG, SR, secondary capture)
  arrives and which source instances it references.
- :func:`store_instances`: one pynetdicom association, C-STORE of every
  instance with its round-trip time; stops at the first failure of the
  association and says why (partial results kept).

Store-to-result latency of an instance = arrival of the first result that
references its SOPInstanceUID minus the start of its C-STORE.

The daemon has to be configured to send results to the catcher
(``[[dicom.destinations]]`` with the catcher's host, port and AE title):
the benchmark cannot reconfigure a running daemon.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from edge.errors import DataError
from edge.tools.progress import Progress
from edge.tools.synthetic_dicom import synthetic_instances

__all__ = [
    "load_instances",
    "ResultCatcher",
    "StoreRecord",
    "store_instances",
    "run_dicom",
]

_log = logging.getLogger(__name__)


def load_instances(folder: Path | str, limit: int = 100000) -> list[Path]:
    """DICOM files under ``folder`` (recursively; ``.dcm`` or a ``DICM`` preamble)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    files = []
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.suffix.lower() == ".dcm":
            files.append(f)
        else:
            with open(f, "rb") as fh:
                if fh.read(132)[128:132] == b"DICM":
                    files.append(f)
        if len(files) >= limit:
            break
    if not files:
        raise DataError(f"No DICOM files in {root}.")
    return files


def _referenced_uids(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in ``ds`` (SEG, SR, SC reference their sources)."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "ReferencedSOPInstanceUID":
                v = elem.value
                if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str):
                    found.update(str(x) for x in v)
                else:
                    found.add(str(v))

    walk(ds)
    return found


@dataclass
class ResultArrival:
    """One result received by the catcher."""

    t_ns: int  # time.perf_counter_ns()
    sop_class_uid: str
    modality: str
    series_description: str
    referenced: set[str]


class ResultCatcher:
    """A storage SCP standing in for the PACS: records arriving results.

    Parameters
    ----------
    port : int
        0 picks a free loopback port (see :attr:`port`).
    ae_title : str
        The AE title the daemon's destination must call.
    keep_datasets : bool
        Also keep the received data sets (the demo renders one).
    """

    def __init__(self, port: int = 0, ae_title: str = "MEDGEPACS", host: str = "127.0.0.1",
                 keep_datasets: bool = False) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        self.ae_title = ae_title
        self.host = host
        self.arrivals: list[ResultArrival] = []
        self.datasets: list[Dataset] = []
        self._keep = keep_datasets
        self._cond = threading.Condition()
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, "1.2.840.10008.1.2",
                                                          "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5"])
        self._ae = ae
        self._server = ae.start_server((host, port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self._server.server_address[1])

    def _on_store(self, event: Any) -> int:
        t = time.perf_counter_ns()
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            refs = _referenced_uids(ds)
        except (ValueError, KeyError, AttributeError) as exc:  # a result we cannot parse still counts
            _log.warning("Result could not be parsed: %s", exc)
            ds, refs = None, set()
        arr = ResultArrival(t, str(getattr(ds, "SOPClassUID", "")), str(getattr(ds, "Modality", "")),
                            str(getattr(ds, "SeriesDescription", "")), refs)
        with self._cond:
            self.arrivals.append(arr)
            if self._keep and ds is not None:
                self.datasets.append(ds)
            self._cond.notify_all()
        return 0x0000

    def wait_for(self, uids: Iterable[str], timeout_s: float) -> set[str]:
        """Wait until results reference every uid in ``uids`` (or the timeout); return those still missing."""
        want = set(uids)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = set().union(*(a.referenced for a in self.arrivals)) if self.arrivals else set()
                missing = want - got
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(min(left, 0.2))

    def first_arrival(self, uid: str) -> ResultArrival | None:
        """The first result that references ``uid``."""
        with self._cond:
            for a in self.arrivals:
                if uid in a.referenced:
                    return a
        return None

    def close(self) -> None:
        """Stop the SCP."""
        self._server.shutdown()

    def __enter__(self) -> "ResultCatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StoreRecord:
    """One C-STORE: its SOPInstanceUID, start (perf_counter_ns), duration and status."""

    sop_instance_uid: str
    t_start_ns: int
    store_ms: float | None
    status: int | None  # DIMSE status, None when no response
    nbytes: int = 0


@dataclass
class StoreRun:
    """All C-STOREs of one association and why it stopped early (if it did)."""

    records: list[StoreRecord] = field(default_factory=list)
    aborted: str | None = None
    wall_s: float = 0.0


def store_instances(host: str, port: int, called_aet: str, calling_aet: str,
                    items: Sequence[Dataset | Path], *, timeout_s: float = 30.0,
                    on_each: Callable[[StoreRecord], None] | None = None) -> StoreRun:
    """C-STORE ``items`` (data sets or file paths) over one association.

    Never raises for network problems: an association that cannot be made,
    is rejected, or dies mid-run ends the run with ``aborted`` set and the
    records so far.
    """
    import pydicom
    from pynetdicom import AE

    out = StoreRun()
    datasets: list[Dataset | Path] = list(items)
    contexts: dict[tuple[str, str], None] = {}
    peeked: list[Dataset] = []
    for it in datasets:
        ds = it if isinstance(it, Dataset) else pydicom.dcmread(it, stop_before_pixels=True)
        peeked.append(ds)
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ExplicitVRLittleEndian))
        contexts[(str(ds.SOPClassUID), ts)] = None
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 5.0)
    by_class: dict[str, list[str]] = {}
    for cls, ts in contexts:
        by_class.setdefault(cls, []).append(ts)
    for cls, tss in list(by_class.items())[:120]:
        ae.add_requested_context(cls, sorted(set(tss + [ExplicitVRLittleEndian])))
    t0 = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "could not be made"
        out.aborted = f"the association with {called_aet}@{host}:{port} {why} (is the daemon's DICOM SCP up?)"
        return out
    try:
        for it, meta in zip(datasets, peeked):
            ds = it if isinstance(it, Dataset) else pydicom.dcmread(it)
            uid = str(meta.SOPInstanceUID)
            t_start = time.perf_counter_ns()
            status = assoc.send_c_store(ds)
            dt = (time.perf_counter_ns() - t_start) / 1e6
            code = int(status.Status) if status and "Status" in status else None
            nbytes = len(getattr(ds, "PixelData", b"") or b"")
            rec = StoreRecord(uid, t_start, dt if code is not None else None, code, nbytes)
            out.records.append(rec)
            if on_each is not None:
                on_each(rec)
            if code is None:
                out.aborted = (f"no C-STORE response from {called_aet}@{host}:{port} "
                               f"(association {'aborted' if assoc.is_aborted else 'lost'})")
                break
            if not assoc.is_established:
                out.aborted = f"the association with {called_aet}@{host}:{port} ended mid-run"
                break
    finally:
        if assoc.is_established:
            assoc.release()
        out.wall_s = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------- run
def run_dicom(args: argparse.Namespace) -> int:
    """Run ``medge bench dicom`` (options: :mod:`edge.commands.bench`).

    Exit status 0, 1 (failed stores or missing results) or 3 (unreachable).
    """
    from edge.tools.endpoints import EXIT_FAILURES, EXIT_OK, EXIT_UNREACHABLE, parse_frame, resolve_client_endpoints

    eps = resolve_client_endpoints(getattr(args, "config", None), host=args.host, port=args.port,
                                   ae_title=args.aet)
    host, port, aet = eps.dicom_host.value, eps.dicom_port.value, eps.dicom_ae_title.value
    print(f"endpoint: {eps.dicom_line()}")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one line per C-STORE otherwise
    frame = parse_frame(args.frame) if args.frame else None
    items, what = _bench_items(args, frame)
    catcher = ResultCatcher(args.results_port, args.results_aet) if args.results_port is not None else None
    print(f"medge bench dicom: {what}"
          + (f"; results expected at {args.results_aet}@127.0.0.1:{catcher.port}" if catcher else ""))
    try:
        res = _store_with_progress(host, port, aet, args, items)
        stored = [r for r in res.records if r.status == 0]
        missing, result_ms = _await_results(catcher, stored, args.results_timeout_s)
    finally:
        if catcher is not None:
            catcher.close()
    store_lat = np.array([r.store_ms for r in res.records if r.store_ms is not None and r.status == 0])
    summary = _bench_summary(len(items), res, stored, store_lat, catcher, result_ms, missing)
    _print_summary(summary, args, with_results=catcher is not None)
    _write_bench_outputs(args, res, summary, store_lat, result_ms,
                         config={"host": host, "port": port, "aet": aet, "source": what})
    if res.aborted:
        print(f"medge bench dicom: error: {res.aborted}; partial results kept"
              + (f" in {args.json}" if args.json else ""), file=sys.stderr)
        return EXIT_UNREACHABLE
    if summary["failed"] or (catcher is not None and missing):
        return EXIT_FAILURES
    return EXIT_OK


def _bench_items(args: argparse.Namespace, frame: Any) -> tuple[list[Dataset | Path], str]:
    """The instances to send (``--files`` or ``--synthetic``) and how to name them."""
    items: list[Dataset | Path]
    if args.files is not None:
        items = list(load_instances(args.files))
        what = f"{len(items)} file(s) from {args.files}"
    else:
        items = list(synthetic_instances(args.synthetic, args.modality, frame))
        what = f"{len(items)} synthetic {args.modality} instance(s)"
    return items, what


def _store_with_progress(host: str, port: int, aet: str, args: argparse.Namespace,
                         items: Sequence[Dataset | Path]) -> StoreRun:
    """:func:`store_instances` with a progress line (on a terminal only)."""
    done = [0]
    line = Progress(plain_interval_s=None)  # on a terminal only

    def progress(rec: StoreRecord) -> None:
        done[0] += 1
        line.show(f"C-STORE {done[0]}/{len(items)}")

    res = store_instances(host, port, aet, args.calling_aet, items,
                          timeout_s=args.timeout_s, on_each=progress)
    line.close()
    return res


def _await_results(catcher: ResultCatcher | None, stored: list[StoreRecord],
                   timeout_s: float) -> tuple[set[str], dict[str, float]]:
    """Instances still without a result after ``timeout_s``, and store-to-result ms of the others."""
    missing: set[str] = set()
    result_ms: dict[str, float] = {}
    if catcher is not None and stored:
        missing = catcher.wait_for([r.sop_instance_uid for r in stored], timeout_s)
        for r in stored:
            a = catcher.first_arrival(r.sop_instance_uid)
            if a is not None:
                result_ms[r.sop_instance_uid] = (a.t_ns - r.t_start_ns) / 1e6
    return missing, result_ms


def _bench_summary(instances: int, res: StoreRun, stored: list[StoreRecord], store_lat: np.ndarray,
                   catcher: ResultCatcher | None, result_ms: dict[str, float], missing: set[str]) -> dict[str, Any]:
    """The ``summary`` of the JSON output: counts, rates and latency statistics."""
    from edge.tools.results import summarize_ms

    total_bytes = sum(r.nbytes for r in stored)
    summary: dict[str, Any] = {
        "instances": instances, "attempted": len(res.records), "stored": len(stored),
        "failed": sum(1 for r in res.records if r.status not in (0, None)),
        "wall_s": round(res.wall_s, 3),
        "instances_per_s": round(len(stored) / res.wall_s, 2) if res.wall_s > 0 else 0.0,
        "pixel_mb_per_s": round(total_bytes / 1e6 / res.wall_s, 2) if res.wall_s > 0 else 0.0,
        "store_ms": summarize_ms(store_lat),
        "aborted": res.aborted,
    }
    if catcher is not None:
        summary["results_received"] = len(catcher.arrivals)
        summary["instances_with_result"] = len(result_ms)
        summary["instances_without_result"] = len(missing)
        summary["store_to_result_ms"] = summarize_ms(list(result_ms.values()))
    return summary


def _print_summary(summary: dict[str, Any], args: argparse.Namespace, *, with_results: bool) -> None:
    """The statistics table, throughput, results and variability warnings."""
    from edge.tools.results import cv_warning, format_table, stats_row

    rows = [stats_row("C-STORE (ms)", summary["store_ms"])]
    if with_results:
        rows.append(stats_row("store-to-result (ms)", summary["store_to_result_ms"]))
    print(format_table(rows))
    print(f"stored {summary['stored']}/{summary['instances']} in {summary['wall_s']:.2f} s: "
          f"{summary['instances_per_s']:.1f} instances/s, {summary['pixel_mb_per_s']:.1f} MB/s of pixel data")
    if with_results:
        print(f"results: {summary['results_received']} received; {summary['instances_with_result']} instance(s) "
              f"with a result, {summary['instances_without_result']} without after {args.results_timeout_s:g} s")
    for name, key in (("C-STORE", "store_ms"), ("store-to-result", "store_to_result_ms")):
        warn = cv_warning(name, summary.get(key, {}), args.cv_warn)
        if warn:
            print(warn)


def _write_bench_outputs(args: argparse.Namespace, res: StoreRun, summary: dict[str, Any], store_lat: np.ndarray,
                         result_ms: dict[str, float], *, config: dict[str, Any]) -> None:
    """``--json``, ``--csv`` and ``--plot``: one sample per C-STORE; print each path written."""
    from edge.tools.results import machine_info, write_outputs

    samples = [{"sop_instance_uid": r.sop_instance_uid, "store_ms": r.store_ms, "status": r.status,
                "result_ms": round(result_ms[r.sop_instance_uid], 3) if r.sop_instance_uid in result_ms else None}
               for r in res.records]
    doc = {"tool": "medge bench dicom", "machine": machine_info(),
           "config": config,
           "summary": summary, "samples": samples}
    series = {"C-STORE": store_lat}
    if result_ms:
        series["store-to-result"] = np.array(list(result_ms.values()))
    for path in write_outputs(doc, [dict(s, index=i) for i, s in enumerate(samples)],
                              ["index", "sop_instance_uid", "store_ms", "status", "result_ms"], series,
                              "medge bench dicom", json_path=args.json, csv_path=args.csv, plot_path=args.plot):
        print(f"wrote {path}")
