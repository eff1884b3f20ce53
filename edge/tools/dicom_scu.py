"""``medge send dicom``: send DICOM files or folders by C-STORE (like ``storescu``).

Files are sent as they are stored (no decode, no transcoding): for each
file the presentation context proposes its own transfer syntax, so
compressed files (JPEG, JPEG-LS, JPEG 2000, RLE) arrive compressed. One
association carries all files (up to 128 distinct SOP class / transfer
syntax pairs).

Examples
--------
>>> report = send_paths(["study/"], host="127.0.0.1", port=11112)  # doctest: +SKIP
>>> report.sent, report.failed  # doctest: +SKIP
(12, 0)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from edge.errors import MedgeError, ProtocolError

__all__ = ["SendReport", "collect_files", "send_paths", "configure_parser", "run"]

_log = logging.getLogger(__name__)


@dataclass
class SendReport:
    """Outcome of one :func:`send_paths` call."""

    sent: int = 0
    failed: int = 0
    skipped: list[str] = field(default_factory=list)  # not DICOM files
    statuses: dict[str, int] = field(default_factory=dict)  # file -> status of the C-STORE response
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "sent": self.sent,
            "failed": self.failed,
            "skipped": self.skipped,
            "statuses": {k: f"0x{v:04X}" for k, v in self.statuses.items()},
            "seconds": round(self.seconds, 3),
        }


def collect_files(paths: Iterable[Path | str], recursive: bool = True) -> list[Path]:
    """Files named directly plus the files inside named folders, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            it = p.rglob("*") if recursive else p.glob("*")
            out.extend(sorted(q for q in it if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise MedgeError(f"{p} is neither a file nor a folder.")
    return out


def send_paths(
    paths: Sequence[Path | str],
    host: str = "127.0.0.1",
    port: int = 11112,
    called_ae: str = "MEDGE",
    calling_ae: str = "MEDGE-SEND",
    recursive: bool = True,
    timeout_s: float = 30.0,
    tls_context: object | None = None,
) -> SendReport:
    """Send every DICOM file under ``paths`` over one association.

    Raises
    ------
    ProtocolError
        If the association cannot be established (``code`` ``association``).
    """
    report = SendReport()
    files: list[tuple[Path, str, str]] = []
    for f in collect_files(paths, recursive):
        try:
            meta = read_file_meta_info(f)
            files.append((f, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            report.skipped.append(str(f))
    if not files:
        return report
    pairs: list[tuple[str, str]] = []
    for _f, sop, ts in files:
        if (sop, ts) not in pairs:
            pairs.append((sop, ts))
    if len(pairs) > 128:
        raise MedgeError(f"{len(pairs)} distinct SOP class/transfer syntax pairs; one association carries at most 128.")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.requested_contexts = [build_context(sop, ts) for sop, ts in pairs]
    t0 = time.perf_counter()
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted or unreachable"
        raise ProtocolError("association", f"Association with {called_ae} at {host}:{port} was {why}.")
    # Send files as stored: pynetdicom otherwise decodes and re-encodes a dataset given by path.
    # (A process-wide pynetdicom setting; restored afterwards.)
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        for f, _sop, _ts in files:
            try:
                rsp = assoc.send_c_store(f)
            except (ValueError, RuntimeError) as exc:
                _log.warning("%s not sent: %s", f, exc)
                report.failed += 1
                report.statuses[str(f)] = 0xFFFF
                continue
            status = int(getattr(rsp, "Status", 0xFFFF)) if rsp else 0xFFFF
            report.statuses[str(f)] = status
            if status == 0 or (status & 0xF000) == 0xB000:
                report.sent += 1
            else:
                report.failed += 1
            if not assoc.is_established:
                break
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    report.seconds = time.perf_counter() - t0
    return report


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Options of ``medge send dicom``."""
    p.add_argument("paths", nargs="+", help="DICOM files or folders (folders are searched recursively)")
    p.add_argument("--host", default="127.0.0.1", help="SCP host (default: $MEDGE_DICOM__HOST, else [dicom] of --config, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=11112, help="SCP port (default: $MEDGE_DICOM__PORT, else [dicom] port of --config, else 11112)")
    p.add_argument("--aet", "--called-ae", dest="called_ae", default="MEDGE", help="called AE title (default: $MEDGE_DICOM__AE_TITLE, else [dicom] ae_title of --config, else MEDGE)")
    p.add_argument("--calling-ae", default="MEDGE-SEND", help="our AE title (default MEDGE-SEND)")
    p.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    p.add_argument("--timeout", type=float, default=30.0, help="ACSE/DIMSE/network timeout in seconds")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    """Send, print a summary; exit status 0 when every file was stored."""
    report = send_paths(
        args.paths,
        host=args.host,
        port=args.port,
        called_ae=args.called_ae,
        calling_ae=args.calling_ae,
        recursive=not args.no_recursive,
        timeout_s=args.timeout,
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for f, st in report.statuses.items():
            if st != 0:
                print(f"{f}: status 0x{st:04X}")
        print(
            f"sent {report.sent}, failed {report.failed}, skipped {len(report.skipped)} (not DICOM) "
            f"in {report.seconds:.2f} s"
        )
    return 0 if report.failed == 0 and report.sent > 0 else 1
