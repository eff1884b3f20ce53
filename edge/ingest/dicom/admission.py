"""Connection admission in front of the DICOM SCP: what a peer must do before it holds an association.

pynetdicom's own server accepts a connection, does the TLS handshake on the
accept thread and then gives the connection an association thread and one
of ``max_associations`` slots for as long as the peer keeps it open. This
module guards the SCP against peers that would exhaust those:

- **many connections from one address**: a connection over
  ``max_per_peer`` (``[dicom] max_associations_per_peer``; pending
  connections and associations from that IP address together) is closed
  at once (``peer_limit``);
- **idle sockets from many addresses**: when ``max_pending``
  (``[dicom] max_pending_connections``) connections are not yet associated,
  a new one evicts the oldest of them (``evicted``), so they cannot lock a
  modality out;
- **slow or stalled starts**: the TLS handshake and the whole
  A-ASSOCIATE-RQ PDU must arrive within ``connect_timeout_s`` in all, on the
  connection's own thread (never the accept thread); a connection that is
  idle, trickles bytes, sends part of a PDU, fails its handshake or sends
  something other than an A-ASSOCIATE-RQ (or one over
  :data:`MAX_ASSOCIATE_RQ_BYTES`) is closed (``timeout``, ``tls``,
  ``protocol``, ``closed``). Only then is the pynetdicom association
  created, so an unassociated connection holds none of the
  ``max_associations`` slots;
- **stalled or oversized PDUs after association**: every PDU must arrive
  whole within ``pdu_timeout_s`` (``[dicom] network_timeout_s``) of its
  first read and declare at most :data:`PDU_LIMIT_BYTES` (the SCP
  advertises :data:`MAX_PDU_BYTES`), or the association ends
  (``pdu_timeout``, ``pdu_too_large``; an A-ABORT for the latter).

Every connection closed before it associated is reported through
``Admission.on_refused(ip, reason, message)`` (``reason`` in
:data:`CONNECTION_REFUSAL_REASONS`), every association ended here through
``Admission.on_aborted`` (:data:`ASSOCIATION_ABORT_REASONS`); the caller
counts and logs them. Messages name limits and sizes, never patient data.

How it plugs into pynetdicom 3.0.4: :class:`AdmittingServer` subclasses
``pynetdicom.transport.ThreadedAssociationServer`` and is made with the
public ``AE.make_server(address, evt_handlers=..., server_class=AdmittingServer,
request_handler=AdmittingRequestHandler, admission=Admission(...))``, which
passes the extra keyword arguments to the server's constructor; the caller
runs its ``serve_forever`` on its own thread (every :data:`POLL_S`). On the
accept thread, ``verify_request`` applies the per-peer limit and eviction
and ``service_actions`` shuts down connections past their deadline
(through :class:`edge.ops.connections.ConnectionTable`).
:class:`AdmittingRequestHandler` runs on the connection's thread: it admits
(handshake, A-ASSOCIATE-RQ), then hands over to pynetdicom's
``RequestHandler.handle``, and replaces the association's
``AssociationSocket`` with a subclass that first serves the bytes already
read and then bounds each PDU read. Two pynetdicom internals are relied on
and named where used: ``RequestHandler._create_association()`` and
``get_request`` wrapping TLS only when the server's ``ssl_context`` is set
(it must be ``None`` here; TLS is ``Admission.tls``).

This module knows nothing of C-STORE, routing or the spool
(:mod:`edge.ingest.dicom.scp` does, and imports this one).

Examples
--------
>>> import logging, threading
>>> from prometheus_client import CollectorRegistry
>>> from pynetdicom import AE
>>> boundary = ErrorBoundary("dicom_scp", logging.getLogger("scp"), CollectorRegistry())  # doctest: +SKIP
>>> admission = Admission(
...     connect_timeout_s=10.0, max_per_peer=4, max_pending=16, tls=None,
...     on_refused=lambda ip, reason, message: None, boundary=boundary,
... )  # doctest: +SKIP
>>> server = AE(ae_title="MEDGE").make_server(
...     ("127.0.0.1", 0), evt_handlers=[], server_class=AdmittingServer,
...     request_handler=AdmittingRequestHandler, admission=admission,
... )  # doctest: +SKIP
>>> threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_S}).start()  # doctest: +SKIP
>>> server.shutdown()  # doctest: +SKIP
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from edge.errors import MedgeError
from edge.ops.boundary import ErrorBoundary
from edge.ops.connections import EVICTED, TIMEOUT, Connection, ConnectionTable, shutdown_socket

__all__ = [
    "MAX_ASSOCIATE_RQ_BYTES",
    "MAX_PDU_BYTES",
    "PDU_LIMIT_BYTES",
    "CONNECTION_REFUSAL_REASONS",
    "ASSOCIATION_ABORT_REASONS",
    "POLL_S",
    "Admission",
    "AdmittingRequestHandler",
    "AdmittingServer",
    "server_ssl_context",
]

#: PDU type of an A-ASSOCIATE-RQ (PS3.8 9.3.2).
_A_ASSOCIATE_RQ = 0x01
#: Largest A-ASSOCIATE-RQ PDU admitted (128 presentation contexts of many transfer syntaxes fit).
MAX_ASSOCIATE_RQ_BYTES = 1 << 20
#: Maximum PDU length the SCP advertises (A-ASSOCIATE-AC): peers send P-DATA PDUs of at most this.
MAX_PDU_BYTES = 4 << 20
#: Longest PDU the SCP reads at all; a header declaring more ends the association before a byte of
#: it is read (A-ABORT). Above MAX_PDU_BYTES so that a peer a little over our maximum is still served.
PDU_LIMIT_BYTES = 16 << 20
#: Values of ``medge_dicom_connections_refused_total{reason}``.
CONNECTION_REFUSAL_REASONS = ("peer_limit", "evicted", "timeout", "tls", "protocol", "closed")
#: Values of ``medge_dicom_associations_aborted_total{reason}``.
ASSOCIATION_ABORT_REASONS = ("pdu_timeout", "pdu_too_large")
#: A-ABORT PDU: source service-provider (2), reason invalid-PDU-parameter-value (6) (PS3.8 9.3.8).
_A_ABORT_INVALID_PDU = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 2, 6)
#: ``poll_interval`` of the accept loop (``serve_forever``): how often it looks for pending connections
#: past their deadline.
POLL_S = 0.25


class _Refused(MedgeError):
    """A connection closed before it associated; ``reason`` is a bounded label value."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Admission:
    """What :class:`AdmittingServer` enforces before pynetdicom sees a connection.

    ``on_refused(ip, reason, message)`` is called (any thread) for every
    connection closed by admission; ``boundary`` counts unexpected errors.
    After admission, a PDU must arrive whole within ``pdu_timeout_s`` of its
    first byte (``None``: no limit) and be at most ``max_pdu_bytes`` long;
    otherwise the association ends and ``on_aborted(ip, reason, message)``
    is called (``reason`` in :data:`ASSOCIATION_ABORT_REASONS`).
    """

    connect_timeout_s: float
    max_per_peer: int
    max_pending: int
    tls: ssl.SSLContext | None
    on_refused: Any
    boundary: ErrorBoundary
    pdu_timeout_s: float | None = None
    max_pdu_bytes: int = PDU_LIMIT_BYTES
    on_aborted: Any = None


class _Pending(Connection):
    """A connection admitted but not yet associated.

    ``reaped``: shut down at its deadline; ``evicted``: shut down to make
    room for a newer connection; ``associated``: its A-ASSOCIATE-RQ is in,
    the association owns the socket now (no deadline: never reaped or evicted).
    """

    __slots__ = ("associated",)

    def __init__(self, sock: socket.socket, ip: str, deadline: float) -> None:
        super().__init__(sock, ip, now=time.monotonic(), deadline=deadline)
        self.associated = False

    @property
    def ip(self) -> str:
        """The peer's address."""
        return self.peer

    @property
    def reaped(self) -> bool:
        """Shut down at its deadline."""
        return self.ended == TIMEOUT

    @property
    def evicted(self) -> bool:
        """Shut down to make room for a newer connection."""
        return self.ended == EVICTED

    @property
    def live(self) -> bool:
        """Still waiting for its handshake or A-ASSOCIATE-RQ (neither shut down nor associated)."""
        return self.ended is None and not self.associated


class _PrefixedAssociationSocket(AssociationSocket):
    """The socket of an admitted association: admitted bytes first, then bounded PDU reads.

    pynetdicom's DUL reads a PDU when :attr:`ready` and then ``recv(6)`` and
    ``recv(length)``; both public members of
    :class:`pynetdicom.transport.AssociationSocket` in pynetdicom 3.0.4.
    This class:

    - first hands out the bytes admission already read (the A-ASSOCIATE-RQ);
    - reads each PDU within ``_pdu_timeout_s`` of the call, however slowly
      its bytes trickle in (pynetdicom's own ``recv`` blocks for as long as
      the peer keeps the connection open, so a peer that sends half a PDU
      and stops held the association, and its slot, forever);
    - refuses a PDU longer than ``_pdu_limit`` bytes before reading it (a
      ``recv`` of more than that can only be the body of such a PDU:
      headers are 6 bytes), sending an A-ABORT.

    In both cases ``recv`` returns fewer bytes than asked, which the DUL
    takes for a closed connection (event 17): it shuts the socket down and
    ends the association, whose thread exits and frees its slot.
    """

    _prefix: bytearray
    _pdu_timeout_s: float | None = None
    _pdu_limit: int = PDU_LIMIT_BYTES
    _on_aborted: Any = None

    @property
    def ready(self) -> bool:
        """True while admitted bytes are left, else as pynetdicom (socket readable or TLS bytes pending)."""
        if self.socket is not None and self._prefix:
            return True
        return bool(super().ready)

    def _aborted(self, reason: str, message: str) -> None:
        if self._on_aborted is not None:
            try:
                ip = str(self.assoc.requestor.address)
            except Exception:  # noqa: BLE001 - only for the log line  # pragma: no cover
                ip = "?"
            self._on_aborted(ip, reason, message)

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the admitted bytes first, then from the socket, within the PDU deadline."""
        out = bytearray()
        if self._prefix:
            out += self._prefix[:nr_bytes]
            del self._prefix[:nr_bytes]
        if len(out) >= nr_bytes:
            return out
        sock = self.socket
        if sock is None:  # pragma: no cover - pynetdicom reads only while connected
            return out
        if nr_bytes > self._pdu_limit:
            try:
                sock.sendall(_A_ABORT_INVALID_PDU)
            except OSError:
                pass
            self._aborted("pdu_too_large", f"a PDU of {nr_bytes} bytes is over the limit of {self._pdu_limit}")
            return out  # short: the DUL ends the association without reading (or allocating) it
        timeout = self._pdu_timeout_s
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while len(out) < nr_bytes:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                chunk = sock.recv(min(nr_bytes - len(out), 1 << 16))
                if not chunk:
                    return out  # the peer closed the connection: short, as pynetdicom's recv
                out += chunk
        except TimeoutError:
            self._aborted(
                "pdu_timeout",
                f"{len(out)} of {nr_bytes} bytes of a PDU arrived within [dicom] network_timeout_s = {timeout:g}",
            )
            return out
        except OSError:
            return out  # reset or TLS error: a closed connection to the DUL
        finally:
            if deadline is not None:
                try:
                    sock.settimeout(timeout)  # sends keep a bound too
                except OSError:
                    pass
        return out


def _close(sock: socket.socket) -> None:
    """Close without a TLS close-notify exchange (the peer may be the one stalling)."""
    shutdown_socket(sock)
    try:
        sock.close()
    except OSError:
        pass


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Exactly ``n`` bytes before ``deadline`` (monotonic), or _Refused."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused("timeout", "no whole A-ASSOCIATE-RQ within [dicom] connect_timeout_s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - len(buf), 65536))
        except TimeoutError:
            raise _Refused("timeout", "no whole A-ASSOCIATE-RQ within [dicom] connect_timeout_s") from None
        except ssl.SSLError as exc:
            raise _Refused("tls", f"TLS error before the A-ASSOCIATE-RQ ({exc.reason or type(exc).__name__})") from None
        except OSError:
            if time.monotonic() >= deadline:  # shut down by the accept loop at the deadline
                raise _Refused("timeout", "no whole A-ASSOCIATE-RQ within [dicom] connect_timeout_s") from None
            raise _Refused("closed", "the connection failed before its A-ASSOCIATE-RQ") from None
        if not chunk:
            if time.monotonic() >= deadline:  # shut down by the accept loop at the deadline
                raise _Refused("timeout", "no whole A-ASSOCIATE-RQ within [dicom] connect_timeout_s")
            raise _Refused("closed", "the peer closed the connection before its A-ASSOCIATE-RQ")
        buf += chunk
    return bytes(buf)


class AdmittingRequestHandler(RequestHandler):
    """pynetdicom's request handler, with admission first, on the connection's own thread."""

    server: "AdmittingServer"
    _prefix: bytes = b""

    def handle(self) -> None:
        """TLS handshake and the whole A-ASSOCIATE-RQ within the deadline, then pynetdicom's handling."""
        server = self.server
        entry = server.pending_entry(self.request)
        if entry is None:  # pragma: no cover - verify_request registers every admitted connection
            deadline = time.monotonic() + server.admission.connect_timeout_s
            entry = _Pending(self.request, str(self.client_address[0]), deadline)
        try:
            try:
                self.request, self._prefix = server.admit(entry)
            except _Refused as exc:
                _close(entry.sock)
                server.release(entry)  # before it is counted: whoever sees the count sees the slot free
                if entry.evicted:
                    server.admission.on_refused(
                        entry.ip,
                        "evicted",
                        "the oldest connection not yet associated was closed to admit a newer one "
                        f"([dicom] max_pending_connections = {server.admission.max_pending})",
                    )
                else:
                    server.admission.on_refused(entry.ip, exc.reason, str(exc))
                return
            super().handle()  # creates the Association (with our socket class) and starts its thread
        except Exception as exc:  # noqa: BLE001 - the admission's one error boundary: count, close, keep serving
            server.admission.boundary.report(exc, "admitting a DICOM connection")
            _close(entry.sock)
        finally:
            server.release(entry)  # after the association started, so the peer is never counted at 0

    def _create_association(self) -> Any:
        # pynetdicom 3.0.4: RequestHandler._create_association() builds the acceptor Association and
        # its AssociationSocket (assoc.dul.socket) around self.request. The socket is swapped for a
        # subclass (no state beyond _prefix) that serves the A-ASSOCIATE-RQ admission read first.
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if not isinstance(sock, AssociationSocket):  # pragma: no cover - a pynetdicom upgrade changed this
            raise MedgeError("pynetdicom's acceptor has no AssociationSocket; admission needs pynetdicom 3.0.")
        sock.__class__ = _PrefixedAssociationSocket
        prefixed = cast(_PrefixedAssociationSocket, sock)
        prefixed._prefix = bytearray(self._prefix)
        admission = self.server.admission
        prefixed._pdu_timeout_s = admission.pdu_timeout_s
        prefixed._pdu_limit = admission.max_pdu_bytes
        prefixed._on_aborted = admission.on_aborted
        return assoc


class AdmittingServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with connection admission in front.

    Made through the public ``AE.make_server(..., server_class=AdmittingServer,
    request_handler=..., admission=...)`` (pynetdicom 3.0.4 passes extra
    keyword arguments to the server class) and run by the caller's thread
    (``serve_forever``), because ``AE.start_server(block=False)`` always
    makes a plain ``ThreadedAssociationServer``. The accept thread only
    accepts, checks the per-peer limit and evicts the oldest pending
    connection when the pending set is full (``verify_request``) and,
    every :data:`POLL_S`, shuts down pending connections past their
    deadline (``service_actions``); the TLS handshake and the read of the
    A-ASSOCIATE-RQ run on the connection's own thread
    (:class:`AdmittingRequestHandler`). ``ssl_context`` must be ``None``:
    TLS is ``admission.tls``, so pynetdicom's ``get_request`` (which would
    handshake on the accept thread) never wraps a socket.
    """

    daemon_threads = True  # a stalled handshake must not hold up shutdown
    block_on_close = False
    request_queue_size = 64  # listen backlog: bursts wait in the kernel, not refused

    def __init__(self, *args: Any, admission: Admission, **kwargs: Any) -> None:
        self.admission = admission
        self._table: ConnectionTable[_Pending] = ConnectionTable()  # oldest first
        self.last_turn = time.monotonic()  # heartbeat of the accept loop (service_actions), for healthy()
        super().__init__(*args, **kwargs)
        if self.ssl_context is not None:
            raise MedgeError("AdmittingServer does TLS itself: pass it as admission.tls, not ssl_context.")

    # ---- accept thread
    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit within the per-peer limit, evicting the oldest pending connection when the pending set is full.

        False closes the new connection at once: over ``max_per_peer``.
        """
        ip = str(client_address[0])
        a = self.admission
        try:  # pynetdicom never sets it: each small C-STORE response would wait for Nagle (~40 ms)
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self._table.lock:
            # An entry that just associated may be counted twice for a moment (here and as an
            # association): on the safe side. Entries shut down are on their way out: not counted.
            from_peer = sum(1 for e in self._table if e.ip == ip and not (e.reaped or e.evicted)) + sum(
                1 for assoc in self.active_associations if assoc.requestor.address == ip
            )
            admitted = from_peer < a.max_per_peer
            if admitted:
                if sum(1 for e in self._table if e.live) >= a.max_pending:
                    # Full: the oldest waiter goes (it has had the longest to send its A-ASSOCIATE-RQ; a
                    # modality sends it within milliseconds), so idle sockets cannot lock a modality out.
                    # Its socket is shut down, which wakes its thread wherever it waits; that thread
                    # closes it and counts it.
                    self._table.evict_oldest(lambda e: not e.associated)
                self._table.add(_Pending(request, ip, time.monotonic() + a.connect_timeout_s))
        if admitted:
            return True
        a.on_refused(
            ip,
            "peer_limit",
            f"{from_peer} connections from this address already ([dicom] max_associations_per_peer = {a.max_per_peer})",
        )
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread (ThreadingMixIn); forget it if that fails."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.release(self.pending_entry(request))
            raise

    def service_actions(self) -> None:
        """pynetdicom's housekeeping, then shut down pending connections past their deadline."""
        super().service_actions()
        self.last_turn = time.monotonic()
        # Wakes each late connection's thread wherever it waits (handshake included); it closes and counts.
        self._table.expire_due(time.monotonic())

    def shutdown(self) -> None:
        """Stop accepting, close the listening socket and every pending connection."""
        # Not AssociationServer.shutdown: it also removes the server from AE._servers (private),
        # where only AE.start_server registers it.
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        self._table.shutdown_all()

    @property
    def pending_count(self) -> int:
        """Connections admitted and still waiting for their handshake or A-ASSOCIATE-RQ."""
        return sum(1 for e in self._table if e.live)

    # ---- connection threads
    def pending_entry(self, request: Any) -> _Pending | None:
        """The pending record of ``request`` (the socket as accepted)."""
        return self._table.get(request)

    def release(self, entry: _Pending | None) -> None:
        """The connection associated or was closed: it is no longer pending."""
        if entry is not None:
            self._table.remove(entry)

    def admit(self, entry: _Pending) -> tuple[socket.socket, bytes]:
        """TLS handshake (if configured) and the whole A-ASSOCIATE-RQ PDU before the entry's deadline.

        Returns the socket to use (the TLS one) and the PDU's bytes; raises _Refused.
        """
        sock, deadline = entry.sock, cast(float, entry.deadline)  # set until the entry associates, below
        tls = self.admission.tls
        if tls is not None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                wrapped = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                raise _Refused("closed", f"the connection failed before the TLS handshake ({type(exc).__name__})") from None
            self._table.swap(entry, wrapped)  # the accept loop must shut down this one now (the plain one is detached)
            sock = wrapped
            try:
                wrapped.do_handshake()
            except TimeoutError:
                raise _Refused("timeout", "no TLS handshake within [dicom] connect_timeout_s") from None
            except ssl.SSLError as exc:
                raise _Refused("tls", f"TLS handshake failed ({exc.reason or type(exc).__name__})") from None
            except OSError:
                if time.monotonic() >= deadline:
                    raise _Refused("timeout", "no TLS handshake within [dicom] connect_timeout_s") from None
                raise _Refused("closed", "the peer closed the connection during the TLS handshake") from None
        header = _recv_exact(sock, 6, deadline)
        pdu_type, _reserved, length = struct.unpack(">BBL", header)
        if pdu_type != _A_ASSOCIATE_RQ:
            raise _Refused("protocol", f"the first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ")
        if length > MAX_ASSOCIATE_RQ_BYTES:
            raise _Refused("protocol", f"its A-ASSOCIATE-RQ of {length} bytes is over {MAX_ASSOCIATE_RQ_BYTES}")
        body = _recv_exact(sock, length, deadline)
        with self._table.lock:
            if entry.evicted or entry.reaped:  # shut down meanwhile: the socket is no use any more
                raise _Refused("timeout" if entry.reaped else "closed", "closed while its A-ASSOCIATE-RQ arrived")
            entry.associated = True  # from here the association owns the socket: never reaped or evicted
            entry.deadline = None
        # pynetdicom reads only when the socket is readable; every read and send is bounded
        # (_PrefixedAssociationSocket sets a deadline per PDU; this bounds sends).
        sock.settimeout(self.admission.pdu_timeout_s)
        return sock, header + body


def server_ssl_context(tls: Any) -> ssl.SSLContext | None:
    """The server-side TLS context for :attr:`Admission.tls`, or ``None`` when TLS is off.

    Parameters
    ----------
    tls : edge.config section ``[dicom.tls]``
        ``cert`` and ``key`` (PEM paths) turn TLS on (TLS 1.2 or later);
        ``ca`` as well requires the peer to present a certificate signed by
        it (mutual TLS). Without ``cert`` or ``key``: ``None``.

    Raises
    ------
    OSError, ssl.SSLError
        A file cannot be read or does not hold what it should.
    """
    if not getattr(tls, "cert", "") or not getattr(tls, "key", ""):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if getattr(tls, "ca", ""):
        ctx.load_verify_locations(cafile=tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the modality must present a certificate
    return ctx
