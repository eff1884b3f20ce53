"""Accepted connections with deadlines: the one table both of the daemon's TCP servers keep.

The HTTP server (:mod:`edge.ops.health`) and the DICOM SCP's admission
(:mod:`edge.ingest.dicom.admission`) each serve a connection on its own thread,
and a peer that connects and then stalls must not hold a thread, a slot or
a file descriptor past its deadline. Both keep a :class:`ConnectionTable`:

* :meth:`ConnectionTable.add` when the accept loop admits a connection;
* :meth:`ConnectionTable.swap` when its thread wraps the socket in TLS;
* :meth:`ConnectionTable.evict_oldest` when the table is full and a newcomer
  should have the slot of the connection that has waited longest;
* :meth:`ConnectionTable.expire_due` from a reaper (the HTTP server's own
  thread; the DICOM accept loop's ``service_actions``);
* :meth:`ConnectionTable.shutdown_all` when the server closes;
* :meth:`ConnectionTable.remove` when the connection's thread is done.

Ending a connection here (timeout, eviction, shutdown) only shuts its
socket down: the thread blocked on it wakes at once, sees
:attr:`Connection.ended`, and closes and counts it itself. Admission
policy (slots, per-peer limits, which connections may be evicted) and the
metrics stay with each server.

Examples
--------
>>> import socket
>>> a, b = socket.socketpair()
>>> table = ConnectionTable()
>>> conn = table.add(Connection(a, "peer", now=0.0, deadline=5.0))
>>> table.expire_due(now=1.0)
([], 5.0)
>>> [c is conn for c in table.expire_due(now=6.0)[0]], conn.ended
([True], 'timeout')
>>> b.recv(1)  # the peer sees the end of the connection
b''
>>> table.remove(conn); len(table)
0
>>> a.close(); b.close()
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

__all__ = ["Connection", "ConnectionTable", "shutdown_socket", "TIMEOUT", "EVICTED", "SHUTDOWN"]

#: Values of :attr:`Connection.ended`: past its deadline, made room for a newer one, the server closed.
TIMEOUT, EVICTED, SHUTDOWN = "timeout", "evicted", "shutdown"


def shutdown_socket(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways (any thread blocked on it returns at once); never raises.

    The plain socket's shutdown, also for an :class:`ssl.SSLSocket`:
    ``SSLSocket.shutdown`` would drop its SSL object under the feet of the
    thread reading it, and no TLS close-notify is exchanged with a peer that
    may be the one stalling.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more, or already detached into its TLS wrapper


class Connection:
    """One accepted connection: its socket and where it stands against its deadline.

    Fields are read and written under the table's lock.

    Attributes
    ----------
    accepted : socket.socket
        The socket as accepted (the table's key).
    sock : socket.socket
        The socket in use: ``accepted`` or its TLS wrapper.
    peer : str
        The peer's address (for logs and per-peer limits).
    since : float
        :func:`time.monotonic` time it began waiting (eviction picks the smallest).
    deadline : float or None
        When it is reaped; ``None``: not now (an answer being computed, an association that owns it).
    ended : str or None
        ``None`` while open; why the table shut it down (:data:`TIMEOUT`, :data:`EVICTED`, :data:`SHUTDOWN`).
    """

    __slots__ = ("accepted", "sock", "peer", "since", "deadline", "ended")

    def __init__(self, sock: socket.socket, peer: str, *, now: float, deadline: float | None) -> None:
        self.accepted = sock
        self.sock = sock
        self.peer = peer
        self.since = now
        self.deadline = deadline
        self.ended: str | None = None

    @property
    def open(self) -> bool:
        """Not shut down by the table."""
        return self.ended is None


C = TypeVar("C", bound=Connection)


class ConnectionTable(Generic[C]):
    """The open connections of one server, in the order they were admitted.

    Every method takes :attr:`lock` (re-entrant): a server holds it around
    a decision that reads the table and changes it (count, evict, add).
    The lock is a :class:`threading.Condition`, notified when a deadline
    may have moved nearer, for a reaper that waits on it.
    """

    def __init__(self) -> None:
        self.lock = threading.Condition(threading.RLock())
        self._conns: dict[int, C] = {}  # id(accepted socket) -> connection; insertion order
        self.stopping = False

    def __len__(self) -> int:
        with self.lock:
            return len(self._conns)

    def __iter__(self) -> Iterator[C]:
        """A snapshot of the connections, oldest first."""
        with self.lock:
            return iter(list(self._conns.values()))

    def add(self, conn: C) -> C:
        """Track ``conn`` (a reaper waiting on :attr:`lock` is woken for its deadline)."""
        with self.lock:
            self._conns[id(conn.accepted)] = conn
            self.lock.notify_all()
        return conn

    def get(self, accepted: Any) -> C | None:
        """The connection of the socket ``accepted``, or ``None``."""
        with self.lock:
            return self._conns.get(id(accepted))

    def remove(self, conn: C) -> None:
        """Stop tracking ``conn`` (its thread is done with it); no-op if it is not here."""
        with self.lock:
            if self._conns.get(id(conn.accepted)) is conn:
                del self._conns[id(conn.accepted)]

    def swap(self, conn: C, sock: socket.socket) -> None:
        """``conn`` now uses ``sock`` (its TLS wrapper); shut it down if ``conn`` ended meanwhile."""
        with self.lock:
            conn.sock = sock
            if conn.ended is not None:
                shutdown_socket(sock)

    def end(self, conn: C, why: str) -> None:
        """Mark ``conn`` ended for ``why`` and shut its socket down (its thread wakes and closes it)."""
        with self.lock:
            conn.ended = why
            conn.deadline = None
            shutdown_socket(conn.sock)

    def evict_oldest(self, waiting: Callable[[C], bool]) -> C | None:
        """End (:data:`EVICTED`) the open connection that has waited longest among those ``waiting`` accepts."""
        with self.lock:
            candidates = [c for c in self._conns.values() if c.ended is None and waiting(c)]
            if not candidates:
                return None
            victim = min(candidates, key=lambda c: c.since)  # on a tie, the earlier admitted
            self.end(victim, EVICTED)
            return victim

    def expire_due(self, now: float) -> tuple[list[C], float | None]:
        """End (:data:`TIMEOUT`) the open connections whose deadline is at or before ``now``.

        Returns them, and the nearest deadline still ahead (``None``: none is).
        """
        expired: list[C] = []
        nearest: float | None = None
        with self.lock:
            for conn in self._conns.values():
                if conn.ended is not None or conn.deadline is None:
                    continue
                if conn.deadline <= now:
                    expired.append(conn)
                elif nearest is None or conn.deadline < nearest:
                    nearest = conn.deadline
            for conn in expired:
                self.end(conn, TIMEOUT)
        return expired, nearest

    def shutdown_all(self) -> None:
        """Set :attr:`stopping`, wake a reaper, and end (:data:`SHUTDOWN`) every open connection."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
            for conn in self._conns.values():
                if conn.ended is None:
                    self.end(conn, SHUTDOWN)
