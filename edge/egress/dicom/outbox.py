"""The durable outbox: results wait here until each destination has them.

Layout under ``<spool_dir>/outbox``:

``pending/<destination>/<SOPInstanceUID>.dcm``
    One copy per destination, written atomically (temp, fsync, rename,
    fsync dir) before the source instances are deleted from the spool.
    Removed only after that destination answered a success (or warning)
    status to the C-STORE.
``pending/<destination>/<SOPInstanceUID>.attempts.json``
    When the destination refused this object with a transient status: the
    wall-clock times of those attempts (so the limit survives a restart).
``dead-letter/<destination>/<SOPInstanceUID>.dcm`` + ``.reason.txt``
    Objects that failed permanently (the peer rejected them: ``0xA9xx``,
    ``0xCxxx``, ``0x01xx``; the peer accepts no presentation context for the
    SOP class) or were refused transiently ``max_attempts`` times within
    ``attempt_window_s``. Kept, counted, never retried automatically;
    ``medge outbox requeue --dead-letter`` puts them back in ``pending/``.
``unsent/``
    Results when no destination is configured (logged once). When the
    outbox starts with at least one destination, everything here is
    re-queued for every destination (:func:`requeue_unsent`), so results
    written before a PACS was configured are sent once it is.

Re-queueing (:func:`requeue_unsent`, :func:`requeue_dead_letters`, used at
start and by ``medge outbox requeue``) only links and renames files inside
the outbox, so it works while the daemon runs: a sender lists its
``pending/<destination>/`` folder on every turn of its loop (at least once
a second when idle, every few seconds while it backs off), so files that
appear there are picked up without a restart. Each moved object's
modification time is set to the time of the re-queue: the oldest-age metric
counts from when an object was queued for its destination.

Metrics per destination: ``medge_outbox_pending`` (objects waiting) and
``medge_outbox_oldest_age_seconds`` (age of the oldest, 0 when none) follow
each object as it is written, sent or dead-lettered, not each batch, and
the folder is listed again on every turn of the sender loop to take in
files moved by someone else.

Disk use: :meth:`Outbox.stored_bytes` is what the result files
(``pending``, ``dead-letter``, ``unsent``) hold, kept up to date as files are
written, sent and moved; the SCP counts it against ``[dicom] spool_max_mb``.
Copies that ``medge outbox requeue`` links in while the daemon runs (one per
extra destination) are counted at the next recount, which the SCP does
before it refuses a C-STORE for the cap.

Retry policy: a destination that cannot be reached (connection refused,
association rejected or aborted, timeout) is retried after
``retry_base_s * 2**(n-1)`` seconds, capped at ``retry_max_s``; its objects
are not charged an attempt for that, so a PACS that is down for hours
loses nothing and is polled at most once per ``retry_max_s``. Every failed
attempt is counted in ``medge_outbox_failures_total``; the log says why
when a destination starts failing or the reason changes, then at most once
a minute while it goes on (with how many attempts failed meanwhile), and
once more when the destination accepts results again.

DICOM TLS (PS3.15 B.1, a destination with ``tls = true``): the association
runs over TLS 1.2 or newer; the server certificate is verified against
``tls_ca`` (empty: the system's CA store) and its name against
``tls_server_name`` (empty: ``host``); ``tls_cert`` + ``tls_key`` are
presented as a client certificate when the peer asks for one. The files are
loaded when the outbox starts (an unusable file is a
:class:`~edge.errors.ConfigError`) and again whenever one of them changes
on disk, so a renewed certificate or CA is picked up without a restart. A
TLS failure (handshake refused, certificate not trusted, name mismatch,
client certificate refused) is a transient delivery failure like an
unreachable peer: the results stay pending, are retried with backoff and
are never dead-lettered for it, so a certificate problem delays delivery
until it is fixed and loses nothing.

The sender loop has one error boundary (component ``outbox``, see
:mod:`edge.ops.boundary`): an unexpected exception is counted in
``medge_internal_errors_total`` and ``medge_outbox_failures_total``, and the
destination backs off and is tried again; nothing is dead-lettered for it.

Examples
--------
>>> import tempfile
>>> from prometheus_client import CollectorRegistry
>>> ob = Outbox(tempfile.mkdtemp(), destinations=[], registry=CollectorRegistry())
>>> ob.pending_count()
0
>>> ob.close()
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from edge.errors import ConfigError
from edge.fileio import atomic_write, fsync_dir
from edge.ingest.dicom.spool import SPOOL_FILE_MODE, safe_name
from edge.ops.boundary import ErrorBoundary
from edge.ops.metrics import metrics_for

__all__ = [
    "Destination",
    "RetryPolicy",
    "Outbox",
    "classify_status",
    "DestinationBacklog",
    "OutboxStatus",
    "outbox_status",
    "requeue_unsent",
    "requeue_dead_letters",
]

_log = logging.getLogger(__name__)

#: while a destination keeps failing for the same reason, at most one log line per this many seconds
_FAILURE_LOG_INTERVAL_S = 60.0
#: while a destination backs off, its folder is listed again this often (files re-queued meanwhile, metrics)
_BACKOFF_RESCAN_S = 5.0


@dataclass(frozen=True)
class Destination:
    """A C-STORE peer: ``name`` (a label, used in metrics and folder names), host, port, AE title.

    ``tls``: send over TLS, verifying the peer against ``tls_ca`` (empty: the
    system's CA store) and ``tls_server_name`` (empty: ``host``);
    ``tls_cert`` + ``tls_key``: our client certificate (see the module docstring).
    """

    name: str
    host: str
    port: int
    ae_title: str
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""

    @classmethod
    def of(cls, d: object) -> "Destination":
        """A :class:`Destination` from any object with the same attributes (``edge.config.DicomDestination``)."""
        return cls(
            str(getattr(d, "name")),
            str(getattr(d, "host")),
            int(getattr(d, "port")),
            str(getattr(d, "ae_title")),
            tls=bool(getattr(d, "tls", False)),
            tls_ca=str(getattr(d, "tls_ca", "") or ""),
            tls_cert=str(getattr(d, "tls_cert", "") or ""),
            tls_key=str(getattr(d, "tls_key", "") or ""),
            tls_server_name=str(getattr(d, "tls_server_name", "") or ""),
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff and give-up bounds (``[outbox]``); see the module docstring."""

    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    max_attempts: int = 10
    attempt_window_s: float = 3600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (>= 1)."""
        return min(self.retry_max_s, self.retry_base_s * (2.0 ** max(0, failures - 1)))


def classify_status(status: int) -> str:
    """``success``, ``transient`` or ``permanent`` for a C-STORE response status.

    Warnings (``0xB000``, ``0xB006``, ``0xB007``: stored with coercion or
    elements discarded) count as success. Out of resources (``0xA7xx``),
    resource limitation (``0x0213``), duplicate invocation (``0x0210``) and
    processing failure (``0x0110``) are transient; the rest (``0xA9xx``
    data set does not match SOP class, ``0xCxxx`` cannot understand,
    ``0x0122`` SOP class not supported, ``0x0124`` not authorised, ...) are
    permanent.
    """
    if status == 0x0000 or status in (0xB000, 0xB006, 0xB007) or (status & 0xF000) == 0xB000:
        return "success"
    if (status & 0xFF00) == 0xA700 or status in (0x0213, 0x0210, 0x0110):
        return "transient"
    return "permanent"


class _RecordingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that notes its TLS error on its context: pynetdicom logs and swallows it."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            _note_tls_error(self.context, exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # TLS 1.3: a client certificate the peer refuses shows up on the first read, not in the handshake.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            _note_tls_error(self.context, exc)
            raise


class _ClientContext(ssl.SSLContext):
    """The TLS client context of one destination; remembers the last TLS error seen on it."""

    sslsocket_class = _RecordingSSLSocket
    last_error: str = ""


def _note_tls_error(ctx: ssl.SSLContext, exc: ssl.SSLError) -> None:
    if isinstance(ctx, _ClientContext):
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = f"certificate verify failed ({str(exc.verify_message).rstrip('.')})"
        else:
            detail = exc.reason or type(exc).__name__  # e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED
        ctx.last_error = f"TLS failed: {detail}"


class _ClientTls:
    """Builds the TLS context of a destination and rebuilds it when one of its files changes."""

    def __init__(self, dest: Destination) -> None:
        self.dest = dest
        self.server_hostname = dest.tls_server_name or dest.host
        self._files = [p for p in (dest.tls_ca, dest.tls_cert, dest.tls_key) if p]
        self._stamp: tuple[Any, ...] | None = None
        self._ctx: _ClientContext | None = None

    def _files_stamp(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in self._files:
            try:
                st = os.stat(p)
                out.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((p, None))
        return tuple(out)

    def context(self) -> _ClientContext:
        """The context for the next association (raises ``ssl.SSLError``/``OSError`` if a file is unusable)."""
        stamp = self._files_stamp()
        if self._ctx is None or stamp != self._stamp:
            self._ctx = self._build()
            self._stamp = stamp
        return self._ctx

    def _build(self) -> _ClientContext:
        d = self.dest
        ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if d.tls_ca:
            ctx.load_verify_locations(cafile=d.tls_ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if d.tls_cert:
            ctx.load_cert_chain(d.tls_cert, d.tls_key or None, password=b"")  # never prompt for a passphrase
        return ctx


class _Backlog:
    """What waits for one destination: how many objects and the oldest one's write time.

    Exact between two listings of the folder: the listing gives the objects
    oldest first; objects written since (:meth:`added`) and sent or
    dead-lettered since (:meth:`removed`) are applied one by one. The caller
    holds the outbox's lock.
    """

    def __init__(self) -> None:
        self.count = 0
        self._listing: list[tuple[float, str]] = []  # (mtime, wall-clock s; file name), oldest first
        self._next = 0  # index of the oldest listed object not removed since
        self._gone: set[str] = set()
        self._added_first: float | None = None  # write time of the first object added since the listing

    def relist(self, listing: list[tuple[float, str]]) -> None:
        self._listing, self._next, self._gone, self._added_first = listing, 0, set(), None
        self.count = len(listing)

    def added(self, when: float) -> None:
        self.count += 1
        if self._added_first is None:
            self._added_first = when

    def removed(self, name: str) -> None:
        self.count = max(0, self.count - 1)
        self._gone.add(name)
        while self._next < len(self._listing) and self._listing[self._next][1] in self._gone:
            self._next += 1

    def oldest(self) -> float | None:
        """Write time (wall clock, s) of the oldest object waiting; None when none is."""
        if self.count == 0:
            return None
        times = [self._listing[self._next][0]] if self._next < len(self._listing) else []
        if self._added_first is not None:
            times.append(self._added_first)
        return min(times) if times else None


@dataclass(frozen=True)
class DestinationBacklog:
    """One destination's folders as :func:`outbox_status` found them.

    ``configured`` is False for a folder left from a destination that is no
    longer in the configuration (its objects are not sent).
    """

    destination: str
    configured: bool
    pending: int
    oldest_age_s: float
    dead_letters: int


@dataclass(frozen=True)
class OutboxStatus:
    """What the outbox folder holds: per destination, and ``unsent`` (results with nowhere to go)."""

    destinations: tuple[DestinationBacklog, ...]
    unsent: int


def _dated(folder: Path) -> list[tuple[int, str, Path]]:
    """``(mtime_ns, name, path)`` of the ``*.dcm`` files in ``folder``, oldest first."""
    dated: list[tuple[int, str, Path]] = []
    for p in folder.glob("*.dcm") if folder.is_dir() else ():
        try:
            dated.append((p.stat().st_mtime_ns, p.name, p))
        except FileNotFoundError:
            continue  # sent (and removed) by a sender thread since the listing
    dated.sort(key=lambda t: (t[0], t[1]))
    return dated


def outbox_status(root: Path | str, destinations: Sequence[str]) -> OutboxStatus:
    """Count what waits in the outbox folder ``root``, without touching it.

    Parameters
    ----------
    root : path-like
        The outbox folder (``<spool_dir>/outbox``).
    destinations : sequence of str
        The configured destination names; folders of other names found on
        disk are listed too, with ``configured=False``.

    Examples
    --------
    >>> import tempfile
    >>> st = outbox_status(tempfile.mkdtemp(), ["pacs"])
    >>> [(d.destination, d.pending, d.oldest_age_s, d.dead_letters) for d in st.destinations], st.unsent
    ([('pacs', 0, 0.0, 0)], 0)
    """
    root = Path(root)
    names = list(dict.fromkeys(destinations))
    for sub in ("pending", "dead-letter"):
        if (root / sub).is_dir():
            names += sorted(p.name for p in (root / sub).iterdir() if p.is_dir() and p.name not in names)
    now = time.time()
    rows = []
    for name in names:
        dated = _dated(root / "pending" / name)
        age = max(0.0, now - dated[0][0] / 1e9) if dated else 0.0
        dead = len(list((root / "dead-letter" / name).glob("*.dcm")))
        rows.append(DestinationBacklog(name, name in destinations, len(dated), age, dead))
    unsent = len(list((root / "unsent").glob("*.dcm")))
    return OutboxStatus(tuple(rows), unsent)


def requeue_unsent(root: Path | str, destinations: Sequence[str]) -> int:
    """Move every result in ``<root>/unsent/`` into ``pending/<name>/`` for each of ``destinations``.

    Crash-safe and durable: each object is first hard-linked (copied where
    the file system cannot link) into every destination but the last, those
    folders are fsync'ed, and only then is it renamed into the last one and
    the folders fsync'ed again. A crash half-way leaves it in ``unsent/``
    and in some ``pending/`` folders; the next call completes the move (an
    object already pending for a destination is left as it is), so nothing
    is lost, and at worst one object is sent twice with the same SOP
    Instance UID, which a PACS treats as a resend. The objects' modification
    times are set to now (see the module docstring). Safe while the daemon
    runs.

    Returns
    -------
    int
        How many objects were moved.

    Raises
    ------
    ValueError
        If ``destinations`` is empty.
    """
    if not destinations:
        raise ValueError("requeue_unsent needs at least one destination.")
    root = Path(root)
    targets = [root / "pending" / name for name in dict.fromkeys(destinations)]
    for t in targets:
        t.mkdir(parents=True, exist_ok=True)
    unsent_dir = root / "unsent"
    files = [p for _, _, p in _dated(unsent_dir)]
    if not files:
        return 0
    tmp_dir = root / "tmp"
    tmp_dir.mkdir(exist_ok=True)
    moved: list[Path] = []
    for src in files:
        try:
            os.utime(src)
        except FileNotFoundError:
            continue  # re-queued by someone else meanwhile
        for t in targets[:-1]:
            target = t / src.name
            try:
                os.link(src, target)
            except FileExistsError:
                pass  # already pending there (an earlier re-queue that was cut short)
            except OSError:  # a file system without hard links: a durable copy
                atomic_write(target, [src.read_bytes()], tmp_dir=tmp_dir, sync_dir=False, mode=SPOOL_FILE_MODE)
        moved.append(src)
    for t in targets[:-1]:
        fsync_dir(t)
    done = 0
    for src in moved:
        try:
            os.replace(src, targets[-1] / src.name)
            done += 1
        except FileNotFoundError:
            continue
    fsync_dir(targets[-1])
    fsync_dir(unsent_dir)
    return done


def requeue_dead_letters(root: Path | str, destination: str) -> int:
    """Move ``destination``'s dead letters back to its pending folder, with a fresh attempt count.

    Each object is renamed into ``pending/<destination>/`` (any attempts
    record there is removed first, so it gets ``max_attempts`` again), the
    folders are fsync'ed, then its ``.reason.txt`` is removed. Safe while
    the daemon runs; its sender picks the objects up on its next turn.

    Returns
    -------
    int
        How many objects were moved.
    """
    root = Path(root)
    dead_dir = root / "dead-letter" / destination
    pend = root / "pending" / destination
    pend.mkdir(parents=True, exist_ok=True)
    moved: list[Path] = []
    for p in sorted(dead_dir.glob("*.dcm")) if dead_dir.is_dir() else ():
        (pend / f"{p.stem}.attempts.json").unlink(missing_ok=True)
        try:
            os.utime(p)
            os.replace(p, pend / p.name)
        except FileNotFoundError:
            continue
        moved.append(p)
    if moved:
        fsync_dir(pend)
        fsync_dir(dead_dir)
    # Reasons of the moved objects, and any left without their object by an earlier cut-short call.
    for reason in dead_dir.glob("*.reason.txt") if dead_dir.is_dir() else ():
        if not reason.with_name(reason.name[: -len(".reason.txt")] + ".dcm").exists():
            reason.unlink(missing_ok=True)
    return len(moved)


def _no_delay(event: Any) -> bool:
    """Turn off Nagle on an outbox association's socket (pynetdicom does not): without it each
    C-STORE to a PACS that answers promptly waits about 40-50 ms for a delayed ACK. Returns True."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not a TCP socket, or pynetdicom changed its attributes
        pass
    return True


class _DestinationState:
    def __init__(self) -> None:
        self.failures = 0
        self.next_try = 0.0
        self.logged_reason = ""
        self.logged_at = 0.0
        self.unlogged = 0


class Outbox:
    """Durable outbox with one sender thread per destination.

    Parameters
    ----------
    root : path-like
        The outbox folder (``<spool_dir>/outbox``).
    destinations : sequence
        Objects with ``name``, ``host``, ``port`` and ``ae_title``, and
        optionally the ``tls*`` attributes of :class:`Destination`
        (``edge.config.DicomDestination`` works).
    registry : prometheus_client.CollectorRegistry
        Where the outbox metrics go.
    policy : RetryPolicy or edge.config.OutboxConfig, optional
        Backoff and give-up bounds.
    calling_ae : str
        Our AE title towards the destinations.
    start : bool
        Start the sender threads now (else call :meth:`start`).

    Raises
    ------
    ConfigError
        If a TLS destination's CA, certificate or key file cannot be loaded.
    """

    def __init__(
        self,
        root: Path | str,
        destinations: Iterable[object],
        registry: CollectorRegistry,
        policy: object | None = None,
        calling_ae: str = "MEDGE",
        dimse_timeout_s: float = 30.0,
        network_timeout_s: float = 30.0,
        start: bool = True,
    ) -> None:
        self.root = Path(root)
        self.destinations = [Destination.of(d) for d in destinations]
        self._tls: dict[str, _ClientTls] = {}
        for dest in self.destinations:
            if dest.tls:
                self._tls[dest.name] = tls = _ClientTls(dest)
                try:
                    tls.context()
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(
                        f"Config key dicom.destinations ({dest.name}): cannot load its TLS files "
                        f"(tls_ca {dest.tls_ca or 'system store'}, tls_cert {dest.tls_cert or 'none'}): {exc}."
                    ) from exc
        p = policy if policy is not None else RetryPolicy()
        self.policy = RetryPolicy(
            retry_base_s=float(getattr(p, "retry_base_s")),
            retry_max_s=float(getattr(p, "retry_max_s")),
            max_attempts=int(getattr(p, "max_attempts")),
            attempt_window_s=float(getattr(p, "attempt_window_s")),
        )
        self.calling_ae = calling_ae
        self.dimse_timeout_s = dimse_timeout_s
        self.network_timeout_s = network_timeout_s
        self.pending_root = self.root / "pending"
        self.dead_root = self.root / "dead-letter"
        self.unsent_dir = self.root / "unsent"
        self.tmp_dir = self.root / "tmp"
        for d in (self.pending_root, self.dead_root, self.unsent_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.iterdir():  # half-written by a crash; the source is still in the spool
            stale.unlink()
        for dest in self.destinations:
            (self.pending_root / dest.name).mkdir(exist_ok=True)
            (self.dead_root / dest.name).mkdir(exist_ok=True)
        if self.destinations:
            self._requeue_unsent_at_start()
        # Bytes of the result files held here and each destination's backlog; changed together
        # with the files, under this lock.
        self._bytes_lock = threading.Lock()
        self._stored_bytes = self._scan_bytes()
        self._backlog = {d.name: _Backlog() for d in self.destinations}
        names = [d.name for d in self.destinations]  # label values that exist (at 0) from the start
        families = metrics_for(registry).outbox
        families.declare_destinations(names)
        self._pending = families.pending
        self._oldest_age = families.oldest_age
        self._sent = families.sent
        self._failures = families.failures
        self._dead = families.dead_letter
        self._store_to_result = families.store_to_result
        # (destination, file name) -> when its earliest source was stored (time.time()); in memory only:
        # results still pending at a restart are delivered but not timed.
        self._stored_at: dict[tuple[str, str], float] = {}
        self._boundary = ErrorBoundary("outbox", _log, registry)
        self._stop = threading.Event()
        self._wake = {d.name: threading.Event() for d in self.destinations}
        self._state = {d.name: _DestinationState() for d in self.destinations}
        self._threads: list[threading.Thread] = []
        self._busy: dict[str, float] = {}  # heartbeat for healthy(): a sender's last progress inside a send
        self._warned_no_destination = False
        for dest in self.destinations:
            self._oldest_age.labels(destination=dest.name).set_function(self._age_reader(dest.name))
            self._relist(dest)
        if start:
            self.start()

    # ------------------------------------------------------------------ API
    def start(self) -> None:
        """Start one sender thread per destination."""
        if self._threads:
            return
        for dest in self.destinations:
            t = threading.Thread(target=self._sender, args=(dest,), name=f"medge-outbox-{dest.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the senders; pending objects stay on disk for the next start."""
        self._stop.set()
        for ev in self._wake.values():
            ev.set()
        for t in self._threads:
            t.join(timeout_s)
        self._threads.clear()

    def healthy(self, stall_s: float = 60.0) -> bool:
        """Whether every sender thread runs and none is stuck inside a send (for ``/readyz``).

        A sender waiting for results or in its retry backoff is healthy,
        whatever the destination does (an unreachable PACS shows in
        ``medge_outbox_pending`` and the failure counters, not in readiness).
        One inside a send must get somewhere (an association, a C-STORE
        response) within ``stall_s`` plus the network and DIMSE timeouts.
        False after :meth:`close`; True with no destinations.
        """
        if self._stop.is_set() or len(self._threads) != len(self.destinations):
            return False
        if not all(t.is_alive() for t in self._threads):
            return False
        limit = stall_s + self.network_timeout_s + self.dimse_timeout_s
        now = time.monotonic()
        return all(now - t0 <= limit for t0 in list(self._busy.values()))

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, ds: Dataset, stored_at: float | None = None) -> list[Path]:
        """Write ``ds`` durably for every destination; returns the written paths.

        ``stored_at`` (``time.time()`` of its earliest source's arrival) times the
        delivery in ``medge_dicom_store_to_result_seconds``.
        """
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()
        name = f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
        written: list[Path] = []
        if not self.destinations:
            if not self._warned_no_destination:
                _log.warning("No [[dicom.destinations]] configured: results are kept in %s.", self.unsent_dir)
                self._warned_no_destination = True
            path = self.unsent_dir / name
            self._write(path, data)
            return [path]
        for dest in self.destinations:
            path = self.pending_root / dest.name / name
            self._write(path, data, dest)
            written.append(path)
            if stored_at is not None:
                self._stored_at[(dest.name, name)] = stored_at
        for dest in self.destinations:
            self._wake[dest.name].set()
        return written

    def pending(self, destination: str) -> list[Path]:
        """Objects waiting for ``destination``, oldest first."""
        return [p for _, _, p in _dated(self.pending_root / destination)]

    def pending_count(self) -> int:
        """Objects waiting, over all destinations."""
        return sum(len(self.pending(d.name)) for d in self.destinations)

    def dead_letters(self, destination: str) -> list[Path]:
        """Objects in the dead-letter folder of ``destination``."""
        return sorted((self.dead_root / destination).glob("*.dcm"))

    def stored_bytes(self, recount: bool = False) -> int:
        """Bytes of the result files in the outbox (pending, dead-letter and unsent).

        Kept up to date as the outbox writes, sends and moves files, so this
        is cheap. ``recount=True`` sums the files on disk again first, which
        also notices files a person removed (e.g. from ``dead-letter/``).
        """
        with self._bytes_lock:  # a file is removed and its bytes uncounted under this lock, together
            if recount:
                self._stored_bytes = self._scan_bytes()
            return self._stored_bytes

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is pending (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pending_count() == 0:
                return True
            time.sleep(0.05)
        return self.pending_count() == 0

    # ------------------------------------------------------------------ internals
    def _scan_bytes(self) -> int:
        total = 0
        for pattern in ("pending/*/*.dcm", "dead-letter/*/*.dcm", "unsent/*.dcm"):
            for p in self.root.glob(pattern):
                try:
                    total += p.stat().st_size
                except FileNotFoundError:  # removed while we looked
                    pass
        return total

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def _requeue_unsent_at_start(self) -> None:
        names = [d.name for d in self.destinations]
        try:
            n = requeue_unsent(self.root, names)
        except OSError as exc:  # they stay in unsent/ (or are pending already); the next start tries again
            _log.error("Could not re-queue the results in %s for %s: %s.", self.unsent_dir, ", ".join(names), exc)
            return
        if n:
            _log.info(
                "Re-queued %d result object(s) written while no destination was configured (%s) for: %s.",
                n, self.unsent_dir, ", ".join(names),
            )

    def _write(self, path: Path, data: bytes, dest: Destination | None = None) -> None:
        with self._bytes_lock:
            old = self._size(path)
            atomic_write(path, [data], tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)
            self._stored_bytes += len(data) - old
            if dest is not None and not old:  # a new object for dest (else the same one, rewritten)
                backlog = self._backlog[dest.name]
                backlog.added(time.time())
                self._pending.labels(destination=dest.name).set(backlog.count)

    def _remove_sent(self, dest: Destination, path: Path) -> None:
        with self._bytes_lock:
            size = self._size(path)
            path.unlink()
            self._stored_bytes -= size
            self._forget(dest, path)

    def _forget(self, dest: Destination, path: Path) -> None:
        """``path`` left ``dest``'s pending folder (sent or dead-lettered); the caller holds the lock."""
        backlog = self._backlog[dest.name]
        backlog.removed(path.name)
        self._pending.labels(destination=dest.name).set(backlog.count)

    def _relist(self, dest: Destination) -> list[Path]:
        """List ``dest``'s pending folder (oldest first) and set its backlog and gauges from it."""
        # Keys that exist before the listing have their file written already (put writes, then adds the key).
        timed = [k for k in list(self._stored_at) if k[0] == dest.name]
        with self._bytes_lock:
            dated = _dated(self.pending_root / dest.name)
            backlog = self._backlog[dest.name]
            backlog.relist([(ns / 1e9, name) for ns, name, _ in dated])
            self._pending.labels(destination=dest.name).set(backlog.count)
        listed = {name for _, name, _ in dated}
        for key in timed:
            if key[1] not in listed:
                self._stored_at.pop(key, None)  # removed by hand or moved away: no delivery to time
        return [p for _, _, p in dated]

    def _age_reader(self, name: str) -> Any:
        """A callable for the oldest-age gauge of destination ``name``, evaluated at scrape time."""

        def age() -> float:
            with self._bytes_lock:
                oldest = self._backlog[name].oldest()
            return 0.0 if oldest is None else max(0.0, time.time() - oldest)

        return age

    def _sender(self, dest: Destination) -> None:
        state = self._state[dest.name]
        wake = self._wake[dest.name]
        while not self._stop.is_set():
            try:
                # Listed on every turn: objects re-queued by `medge outbox requeue` are seen without a wake.
                paths = self._relist(dest)
                now = time.monotonic()
                if now < state.next_try:
                    wake.wait(min(state.next_try - now, _BACKOFF_RESCAN_S))
                    wake.clear()
                    continue
                if not paths:
                    wake.wait(1.0)
                    wake.clear()
                    continue
                self._busy[dest.name] = time.monotonic()
                self._send_batch(dest, state, paths)
            except Exception as exc:  # noqa: BLE001 - the sender's one error boundary: count, back off, go on
                self._boundary.report(exc, f"sending to {dest.name}")
                self._failures.labels(destination=dest.name).inc()
                self._backoff(dest, state, f"internal error ({type(exc).__name__})")
            finally:
                self._busy.pop(dest.name, None)

    def _backoff(self, dest: Destination, state: _DestinationState, why: str) -> None:
        state.failures += 1
        delay = self.policy.delay(state.failures)
        now = time.monotonic()
        state.next_try = now + delay
        # Logged when the destination starts failing or the reason changes, else once a minute.
        if why != state.logged_reason or now - state.logged_at >= _FAILURE_LOG_INTERVAL_S:
            more = f" ({state.unlogged} more failed attempts since the last report)" if state.unlogged else ""
            _log.warning(
                "Destination %s (%s:%d %s%s): %s; attempt %d failed, next try in %.1f s; results stay pending%s.",
                dest.name, dest.host, dest.port, dest.ae_title, ", TLS" if dest.tls else "", why,
                state.failures, delay, more,
            )
            state.logged_reason, state.logged_at, state.unlogged = why, now, 0
        else:
            state.unlogged += 1

    def _recovered(self, dest: Destination, state: _DestinationState) -> None:
        if state.failures:
            _log.info("Destination %s accepts results again after %d failed attempts.", dest.name, state.failures)
        state.failures = 0
        state.logged_reason, state.unlogged = "", 0

    def _send_batch(self, dest: Destination, state: _DestinationState, paths: list[Path]) -> None:
        items: list[tuple[Path, Dataset]] = []
        for p in paths[:100]:
            try:
                items.append((p, dcmread(p)))
            except (InvalidDicomError, OSError, ValueError) as exc:
                self._dead_letter(dest, p, f"unreadable outbox file: {type(exc).__name__}")
        if not items:
            return
        ae = AE(ae_title=self.calling_ae)
        ae.dimse_timeout = self.dimse_timeout_s
        ae.network_timeout = self.network_timeout_s
        ae.acse_timeout = self.network_timeout_s
        ae.connection_timeout = min(10.0, self.network_timeout_s)
        contexts: dict[str, list[str]] = {}
        for _p, ds in items:
            sop = str(ds.SOPClassUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
            syntaxes = contexts.setdefault(sop, [ts])
            for extra in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if extra not in syntaxes:
                    syntaxes.append(extra)
        ae.requested_contexts = [build_context(sop, ts) for sop, ts in list(contexts.items())[:128]]
        tls_args: tuple[ssl.SSLContext, str] | None = None
        ctx: _ClientContext | None = None
        client_tls = self._tls.get(dest.name)
        if client_tls is not None:
            try:
                ctx = client_tls.context()
            except (OSError, ssl.SSLError) as exc:  # e.g. a certificate file half-way through being replaced
                self._failures.labels(destination=dest.name).inc()
                self._backoff(dest, state, f"cannot load its TLS files: {exc}")
                return
            ctx.last_error = ""
            tls_args = (ctx, client_tls.server_hostname)
        connected: list[bool] = []
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(_no_delay(event)))],
        )
        if not assoc.is_established:
            if ctx is not None and ctx.last_error:
                why = ctx.last_error
            elif not connected:  # pynetdicom reports a refused connection as an abort
                why = "cannot connect (refused, unreachable or timed out)"
            else:
                why = "association rejected" if assoc.is_rejected else "association aborted"
            self._failures.labels(destination=dest.name).inc()
            self._backoff(dest, state, why)
            return
        trouble: str | None = None
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            for path, ds in items:
                if self._stop.is_set():
                    break
                if str(ds.SOPClassUID) not in accepted:
                    self._failures.labels(destination=dest.name).inc()
                    self._dead_letter(dest, path, f"destination accepts no presentation context for SOP class {ds.SOPClassUID}")
                    continue
                rsp = assoc.send_c_store(ds)
                self._busy[dest.name] = time.monotonic()
                status = int(getattr(rsp, "Status", -1)) if rsp else -1
                if status < 0:
                    trouble = "no response (timeout or aborted association)"
                    self._failures.labels(destination=dest.name).inc()
                    break
                verdict = classify_status(status)
                if verdict == "success":
                    # Counted before the file goes: whoever sees the outbox empty sees it counted.
                    self._sent.labels(destination=dest.name).inc()
                    stored_at = self._stored_at.pop((dest.name, path.name), None)
                    if stored_at is not None:
                        self._store_to_result.labels(destination=dest.name).observe(max(0.0, time.time() - stored_at))
                    self._remove_sent(dest, path)
                    self._attempts_path(path).unlink(missing_ok=True)
                    self._recovered(dest, state)
                    continue
                self._failures.labels(destination=dest.name).inc()
                if verdict == "permanent":
                    self._dead_letter(dest, path, f"destination refused it with status 0x{status:04X}")
                    continue
                if self._charge_attempt(path):
                    self._dead_letter(
                        dest,
                        path,
                        f"refused {self.policy.max_attempts} times within {self.policy.attempt_window_s:.0f} s; "
                        f"last status 0x{status:04X}",
                    )
                    continue
                trouble = f"transient failure status 0x{status:04X}"
                break
        finally:
            if assoc.is_established:
                assoc.release()
        # Deleting a sent object needs no fsync: if the deletion is lost in a crash the
        # object is sent again with the same SOP Instance UID, which a PACS treats as a resend.
        if trouble is not None:
            self._backoff(dest, state, trouble)

    def _attempts_path(self, path: Path) -> Path:
        return path.with_name(path.stem + ".attempts.json")

    def _charge_attempt(self, path: Path) -> bool:
        """Record one transient refusal of ``path``; True when it has used up its attempts."""
        ap = self._attempts_path(path)
        now = time.time()
        try:
            times = [float(t) for t in json.loads(ap.read_text(encoding="utf-8"))]
        except (FileNotFoundError, ValueError):
            times = []
        times = [t for t in times if now - t < self.policy.attempt_window_s] + [now]
        atomic_write(ap, [json.dumps(times).encode("utf-8")], tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)
        return len(times) >= self.policy.max_attempts

    def _dead_letter(self, dest: Destination, path: Path, reason: str) -> None:
        target_dir = self.dead_root / dest.name
        target_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(target_dir / f"{path.stem}.reason.txt", [f"{reason}\n".encode("utf-8")],
                     tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)
        target = target_dir / path.name
        with self._bytes_lock:
            replaced = self._size(target)  # an earlier dead letter of the same object
            shutil.move(str(path), target)
            self._stored_bytes -= replaced
            self._forget(dest, path)
        self._attempts_path(path).unlink(missing_ok=True)
        self._dead.labels(destination=dest.name).inc()
        self._stored_at.pop((dest.name, path.name), None)
        _log.error("Result %s for destination %s moved to the dead-letter folder: %s.", path.name, dest.name, reason)
