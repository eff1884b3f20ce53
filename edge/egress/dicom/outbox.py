"""The durable outbox: results wait here until each destination has them.

:class:`Outbox` writes each result once per destination into the outbox
folder (``<spool_dir>/outbox``; its layout, and re-queueing, are in
:mod:`edge.egress.dicom.outbox_files`) and runs one sender thread per
destination. A sender takes up to 100 of its destination's pending objects,
oldest first, and sends them over one association (C-STORE SCU); each
object's response status decides its fate (:func:`classify_status`): sent
objects are removed, rejected ones are moved to the dead-letter folder with
the reason, and a transiently refused object waits its own backoff while
the others go on (no head-of-line blocking). A refusal for lack of
resources (:func:`out_of_resources`: ``0xA7xx``, ``0x0213``) is never
charged an attempt, so a PACS that is full for hours loses nothing; other
transient refusals are charged, and ``max_attempts`` of them within
``attempt_window_s`` dead-letter the object.

A sender lists its ``pending/<destination>/`` folder on every turn of its
loop (at least once a second when idle, every few seconds while it backs
off), so files that ``medge outbox requeue`` moves there while the daemon
runs are picked up without a restart.

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

DICOM TLS (a destination with ``tls = true``; the client context, its files
and how they are verified and reloaded are in :mod:`edge.egress.dicom.tls`):
the files are loaded when the outbox starts (an unusable file is a
:class:`~edge.errors.ConfigError`) and again whenever one of them changes
on disk. A TLS failure (handshake refused, certificate not trusted, name
mismatch, client certificate refused) is a transient delivery failure like
an unreachable peer: the results stay pending, are retried with backoff and
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
import logging
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from edge.egress.dicom.outbox_files import (
    DEAD_LETTER_DIR,
    OBJECT_SUFFIX,
    PENDING_DIR,
    TMP_DIR,
    UNSENT_DIR,
    attempts_path,
    charge_attempt,
    dated_objects,
    object_name,
    reason_path,
    requeue_unsent,
    result_bytes,
)
from edge.egress.dicom.tls import ClientContext, ClientTls
from edge.errors import ConfigError
from edge.fileio import atomic_write
from edge.ingest.dicom.spool import SPOOL_FILE_MODE
from edge.ops.boundary import ErrorBoundary
from edge.ops.metrics import metrics_for

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

__all__ = [
    "Destination",
    "RetryPolicy",
    "Outbox",
    "classify_status",
    "out_of_resources",
]

_log = logging.getLogger(__name__)

#: while a destination keeps failing for the same reason, at most one log line per this many seconds
_FAILURE_LOG_INTERVAL_S = 60.0
#: while a destination backs off, its folder is listed again this often (files re-queued meanwhile, metrics)
_BACKOFF_RESCAN_S = 5.0
#: objects sent over one association (oldest first); the rest wait for the next turn
_BATCH_MAX = 100
#: presentation contexts one association may propose (PS3.8: odd IDs 1-255)
_CONTEXTS_MAX = 128


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

    Of the transient ones, :func:`out_of_resources` are never charged an
    attempt (see the module docstring).

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


def out_of_resources(status: int) -> bool:
    """Whether a refusal says the destination lacks resources now (``0xA7xx``, ``0x0213``).

    PS3.4 B.2.3 defines *Refused: Out of Resources* (``0xA7xx``) for C-STORE
    and PS3.7 C.4 *Resource limitation* (``0x0213``) for any DIMSE service:
    the object itself is fine and a later try can succeed. Such a refusal is
    retried with backoff like an unreachable destination, never charged an
    attempt and never dead-lettered.

    Examples
    --------
    >>> out_of_resources(0xA700), out_of_resources(0xA7FF), out_of_resources(0x0213), out_of_resources(0x0110)
    (True, True, True, False)
    """
    return (status & 0xFF00) == 0xA700 or status == 0x0213

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


def _client_tls(destinations: Iterable[Destination]) -> dict[str, ClientTls]:
    """The TLS of each TLS destination by name, its files loaded once (``ConfigError`` if they cannot be)."""
    out: dict[str, ClientTls] = {}
    for dest in destinations:
        if dest.tls:
            out[dest.name] = tls = ClientTls(dest)
            try:
                tls.context()
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"Config key dicom.destinations ({dest.name}): cannot load its TLS files "
                    f"(tls_ca {dest.tls_ca or 'system store'}, tls_cert {dest.tls_cert or 'none'}): {exc}."
                ) from exc
    return out


def _no_delay(event: Any) -> bool:
    """Turn off Nagle on an outbox association's socket (pynetdicom does not): without it each
    C-STORE to a PACS that answers promptly waits about 40-50 ms for a delayed ACK. Returns True."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # not a TCP socket, or pynetdicom changed its attributes
        pass
    return True


class _DestinationState:
    """One sender's failure streak: count, when to try next, what was last logged and how much since."""

    def __init__(self) -> None:
        self.failures = 0
        self.next_try = 0.0
        self.logged_reason = ""
        self.logged_at = 0.0
        self.unlogged = 0
        # Objects a refusal holds back (file name -> (refusals, monotonic time of the next try)).
        self.held: dict[str, tuple[int, float]] = {}

    def ready(self, paths: list[Path], now: float) -> tuple[list[Path], float | None]:
        """The objects of ``paths`` not held back at ``now``, and when the next held one is due."""
        names = {p.name for p in paths}
        self.held = {k: v for k, v in self.held.items() if k in names}  # sent, moved away or re-queued
        ready = [p for p in paths if self.held.get(p.name, (0, 0.0))[1] <= now]
        due = [t for _, t in self.held.values() if t > now]
        return ready, (min(due) if due else None)


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
        self._tls = _client_tls(self.destinations)
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
        self.pending_root = self.root / PENDING_DIR
        self.dead_root = self.root / DEAD_LETTER_DIR
        self.unsent_dir = self.root / UNSENT_DIR
        self.tmp_dir = self.root / TMP_DIR
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
        self._stored_bytes = result_bytes(self.root)
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
        name = object_name(str(ds.SOPInstanceUID))
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
        return [p for _, _, p in dated_objects(self.pending_root / destination)]

    def pending_count(self) -> int:
        """Objects waiting, over all destinations."""
        return sum(len(self.pending(d.name)) for d in self.destinations)

    def dead_letters(self, destination: str) -> list[Path]:
        """Objects in the dead-letter folder of ``destination``."""
        return sorted((self.dead_root / destination).glob(f"*{OBJECT_SUFFIX}"))

    def stored_bytes(self, recount: bool = False) -> int:
        """Bytes of the result files in the outbox (pending, dead-letter and unsent).

        Kept up to date as the outbox writes, sends and moves files, so this
        is cheap. ``recount=True`` sums the files on disk again first, which
        also notices files a person removed (e.g. from ``dead-letter/``).
        """
        with self._bytes_lock:  # a file is removed and its bytes uncounted under this lock, together
            if recount:
                self._stored_bytes = result_bytes(self.root)
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
            dated = dated_objects(self.pending_root / dest.name)
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
                paths, due = state.ready(paths, now)  # a refused object waits out its backoff; others go
                if not paths:
                    wake.wait(min(due - now, _BACKOFF_RESCAN_S) if due is not None else 1.0)
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
        state.next_try = time.monotonic() + delay
        self._report(dest, state, why, state.failures, delay, "results stay pending")

    def _hold(self, dest: Destination, state: _DestinationState, path: Path, why: str) -> None:
        """Hold ``path`` back for its own backoff after a transient refusal; the other objects go on."""
        refusals = state.held.get(path.name, (0, 0.0))[0] + 1
        delay = self.policy.delay(refusals)
        state.held[path.name] = (refusals, time.monotonic() + delay)
        self._report(dest, state, why, refusals, delay, "that result stays pending, the others go on")

    def _report(
        self, dest: Destination, state: _DestinationState, why: str, attempt: int, delay: float, fate: str
    ) -> None:
        """Log a failure when the destination starts failing or the reason changes, else once a minute."""
        now = time.monotonic()
        if why != state.logged_reason or now - state.logged_at >= _FAILURE_LOG_INTERVAL_S:
            more = f" ({state.unlogged} more failed attempts since the last report)" if state.unlogged else ""
            _log.warning(
                "Destination %s (%s:%d %s%s): %s; attempt %d failed, next try in %.1f s; %s%s.",
                dest.name, dest.host, dest.port, dest.ae_title, ", TLS" if dest.tls else "", why,
                attempt, delay, fate, more,
            )
            state.logged_reason, state.logged_at, state.unlogged = why, now, 0
        else:
            state.unlogged += 1

    def _recovered(self, dest: Destination, state: _DestinationState) -> None:
        if state.failures:
            _log.info("Destination %s accepts results again after %d failed attempts.", dest.name, state.failures)
        state.failures = 0
        state.logged_reason, state.unlogged = "", 0

    # ------------------------------------------------------------------ one batch over one association
    def _send_batch(self, dest: Destination, state: _DestinationState, paths: list[Path]) -> None:
        """Send the oldest of ``paths`` to ``dest`` over one association; back off if it cannot go on."""
        items = self._read_batch(dest, paths)
        if not items:
            return
        ae = self._application_entity(items)
        try:
            tls_args, ctx = self._tls_args(dest)
        except (OSError, ssl.SSLError) as exc:  # e.g. a certificate file half-way through being replaced
            self._failures.labels(destination=dest.name).inc()
            self._backoff(dest, state, f"cannot load its TLS files: {exc}")
            return
        connected: list[bool] = []
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(_no_delay(event)))],
        )
        if not assoc.is_established:
            self._failures.labels(destination=dest.name).inc()
            self._backoff(dest, state, _association_failure(assoc, ctx, bool(connected)))
            return
        trouble = self._store_batch(dest, state, assoc, items)
        # Deleting a sent object needs no fsync: if the deletion is lost in a crash the
        # object is sent again with the same SOP Instance UID, which a PACS treats as a resend.
        if trouble is not None:
            self._backoff(dest, state, trouble)

    def _read_batch(self, dest: Destination, paths: list[Path]) -> list[tuple[Path, Dataset]]:
        """The first :data:`_BATCH_MAX` of ``paths``, read; an unreadable one is dead-lettered."""
        items: list[tuple[Path, Dataset]] = []
        for p in paths[:_BATCH_MAX]:
            try:
                items.append((p, dcmread(p)))
            except (InvalidDicomError, OSError, ValueError) as exc:
                self._dead_letter(dest, p, f"unreadable outbox file: {type(exc).__name__}")
        return items

    def _application_entity(self, items: Sequence[tuple[Path, Dataset]]) -> AE:
        """Our AE for one association: the outbox's timeouts, a context for each SOP class in ``items``."""
        ae = AE(ae_title=self.calling_ae)
        ae.dimse_timeout = self.dimse_timeout_s
        ae.network_timeout = self.network_timeout_s
        ae.acse_timeout = self.network_timeout_s
        ae.connection_timeout = min(10.0, self.network_timeout_s)
        ae.requested_contexts = _presentation_contexts(items)
        return ae

    def _tls_args(self, dest: Destination) -> tuple[tuple[ssl.SSLContext, str] | None, ClientContext | None]:
        """pynetdicom's ``tls_args`` for ``dest`` and its context, its last error cleared (None, None: no TLS).

        Raises ``OSError``/``ssl.SSLError`` when one of its TLS files cannot be loaded.
        """
        client_tls = self._tls.get(dest.name)
        if client_tls is None:
            return None, None
        ctx = client_tls.context()
        ctx.last_error = ""
        return (ctx, client_tls.server_hostname), ctx

    def _store_batch(
        self, dest: Destination, state: _DestinationState, assoc: Association, items: list[tuple[Path, Dataset]]
    ) -> str | None:
        """C-STORE ``items`` in order on ``assoc``, then release it; why to back off, or None."""
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            for path, ds in items:
                if self._stop.is_set():
                    break
                if str(ds.SOPClassUID) not in accepted:
                    self._failures.labels(destination=dest.name).inc()
                    why = f"destination accepts no presentation context for SOP class {ds.SOPClassUID}"
                    self._dead_letter(dest, path, why)
                    continue
                rsp = assoc.send_c_store(ds)
                self._busy[dest.name] = time.monotonic()
                status = int(getattr(rsp, "Status", -1)) if rsp else -1
                trouble = self._settle(dest, state, path, status)
                if trouble is not None:
                    return trouble
        finally:
            if assoc.is_established:
                assoc.release()
        return None

    def _settle(self, dest: Destination, state: _DestinationState, path: Path, status: int) -> str | None:
        """Act on the C-STORE response ``status`` for ``path`` (-1: none); why to stop the batch, or None."""
        if status < 0:
            self._failures.labels(destination=dest.name).inc()
            return "no response (timeout or aborted association)"
        verdict = classify_status(status)
        if verdict == "success":
            self._delivered(dest, state, path)
            return None
        self._failures.labels(destination=dest.name).inc()
        if verdict == "permanent":
            self._dead_letter(dest, path, f"destination refused it with status 0x{status:04X}")
            return None
        if out_of_resources(status):  # the destination is short of resources: wait, however long
            self._hold(dest, state, path, f"out of resources, status 0x{status:04X}")
            return None
        if self._charge_attempt(path):
            self._dead_letter(
                dest,
                path,
                f"refused {self.policy.max_attempts} times within {self.policy.attempt_window_s:.0f} s; "
                f"last status 0x{status:04X}",
            )
            return None
        self._hold(dest, state, path, f"transient failure status 0x{status:04X}")
        return None

    def _delivered(self, dest: Destination, state: _DestinationState, path: Path) -> None:
        """``dest`` has ``path``: count and time it, then remove it and its attempts record."""
        # Counted before the file goes: whoever sees the outbox empty sees it counted.
        self._sent.labels(destination=dest.name).inc()
        stored_at = self._stored_at.pop((dest.name, path.name), None)
        if stored_at is not None:
            self._store_to_result.labels(destination=dest.name).observe(max(0.0, time.time() - stored_at))
        self._remove_sent(dest, path)
        attempts_path(path).unlink(missing_ok=True)
        state.held.pop(path.name, None)
        self._recovered(dest, state)

    def _charge_attempt(self, path: Path) -> bool:
        """Record one transient refusal of ``path``; True when it has used up its attempts."""
        return charge_attempt(path, self.policy.attempt_window_s, self.tmp_dir) >= self.policy.max_attempts

    def _dead_letter(self, dest: Destination, path: Path, reason: str) -> None:
        """Move ``path`` to ``dest``'s dead-letter folder, with ``reason`` beside it, and count it."""
        target_dir = self.dead_root / dest.name
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / path.name
        atomic_write(reason_path(target), [f"{reason}\n".encode("utf-8")], tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)
        with self._bytes_lock:
            replaced = self._size(target)  # an earlier dead letter of the same object
            shutil.move(str(path), target)
            self._stored_bytes -= replaced
            self._forget(dest, path)
        attempts_path(path).unlink(missing_ok=True)
        self._state[dest.name].held.pop(path.name, None)
        self._dead.labels(destination=dest.name).inc()
        self._stored_at.pop((dest.name, path.name), None)
        _log.error("Result %s for destination %s moved to the dead-letter folder: %s.", path.name, dest.name, reason)


def _presentation_contexts(items: Sequence[tuple[Path, Dataset]]) -> list[PresentationContext]:
    """One context per SOP class in ``items`` (at most :data:`_CONTEXTS_MAX`): its first object's
    transfer syntax, then Explicit and Implicit VR Little Endian."""
    contexts: dict[str, list[str]] = {}
    for _p, ds in items:
        sop = str(ds.SOPClassUID)
        ts = str(ds.file_meta.TransferSyntaxUID)
        syntaxes = contexts.setdefault(sop, [ts])
        for extra in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if extra not in syntaxes:
                syntaxes.append(extra)
    return [build_context(sop, ts) for sop, ts in list(contexts.items())[:_CONTEXTS_MAX]]


def _association_failure(assoc: Association, ctx: ClientContext | None, connected: bool) -> str:
    """Why ``assoc`` was not established: the TLS error on ``ctx``, no connection, rejected or aborted."""
    if ctx is not None and ctx.last_error:
        return ctx.last_error
    if not connected:  # pynetdicom reports a refused connection as an abort
        return "cannot connect (refused, unreachable or timed out)"
    return "association rejected" if assoc.is_rejected else "association aborted"
