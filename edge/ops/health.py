"""HTTP endpoints for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

* ``/metrics``: the registry passed in, through prometheus_client's own
  exposition: the format the scraper's ``Accept`` header asks for (OpenMetrics
  for ``application/openmetrics-text``, else the Prometheus text format; see
  :func:`prometheus_client.exposition.choose_encoder`), gzipped when its
  ``Accept-Encoding`` allows ``gzip``.
* ``/healthz``: 200 while the process serves HTTP at all (liveness). The
  body's first line is ``ok``; the daemon adds one line per ``[[capture]]``
  source after it (``capture <name>: <state>; <counts>``, see
  :meth:`edge.daemon.Daemon.capture_status`), which never change the code.
* ``/readyz``: 200 (body ``ready``) once every model is loaded and warmed
  up and the ingest sockets are bound, while every serving loop is alive
  and making progress; 503 before that, while shutting down and whenever a
  loop has died or is wedged, with the reason in the body (``not ready:``
  then one ``component: reason`` line each; never request data).

Hardening, in the style of the Prometheus exporters' web configuration
(``exporter-toolkit``):

* **Bounds** (always on): every request must be complete (request line,
  headers and any small body) within ``idle_timeout_s``, counted from the
  accept (the TLS handshake included) or, on a keep-alive connection, from
  the end of the previous response; a response must be written within
  ``idle_timeout_s`` too. A connection that misses its deadline is shut
  down by a reaper thread, however it trickles its bytes (slowloris). At
  most ``max_connections`` connections are served at once; a newcomer beyond
  that evicts the connection that has waited longest for its request (so a
  scraper always gets in while slow clients churn), and is closed at accept
  only when every connection is busy answering a request. The TLS handshake
  runs in the connection's own thread, never in the accept loop.
* **Request bodies**: a body announced by ``Content-Length`` (up to 64 KiB)
  is read and discarded, so it is never parsed as the next request; a larger
  one is answered ``413``, an unusable length or ``Transfer-Encoding``
  ``400``, and the connection is closed.
* **TLS** (off by default): ``tls_cert`` + ``tls_key`` serve HTTPS (TLS 1.2
  or newer); ``tls_client_ca`` also requires a client certificate signed by
  that CA.
* **Basic auth** (off by default, :mod:`edge.ops.http_auth`):
  ``basic_auth_file`` is an htpasswd file of bcrypt hashes (``htpasswd -nbB
  user password``). Every endpoint, the probes included, then answers 401
  without valid credentials. A successful
  check is cached in memory as the SHA-256 of the password (compared in
  constant time), so a scrape every 15 s costs one bcrypt per process, not
  one per scrape. The file is read once at start-up. Neither the password
  nor the ``Authorization`` header is ever logged.

Each request is answered inside an error boundary (component ``http``, see
:mod:`edge.ops.boundary`): a failure answers 500, is counted in
``medge_internal_errors_total{component="http"}`` and the server keeps
serving.

Examples
--------
>>> from prometheus_client import CollectorRegistry
>>> with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: True) as srv:
...     srv.port > 0
True
"""

from __future__ import annotations

import gzip
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from edge.errors import ConfigError
from edge.ops.boundary import ErrorBoundary, LogThrottle
from edge.ops.connections import EVICTED, Connection, ConnectionTable
from edge.ops.http_auth import HtpasswdAuth

__all__ = ["HealthServer"]

_log = logging.getLogger(__name__)

_REALM = 'Basic realm="medge"'
_TEXT = "text/plain; charset=utf-8"
_ROUTES = ("/metrics", "/healthz", "/readyz")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_MAX_DISCARDED_BODY = 64 * 1024  # a GET's body read and thrown away; larger ones are refused (413)

# Connection states (see _Conn). A connection waiting for its request (or handshake) may be evicted.
_HANDSHAKE, _WAITING, _BUSY, _WRITING = "handshake", "waiting", "busy", "writing"


def _more(held: int) -> str:
    return f" ({held} more since the last report)" if held else ""


def _server_ssl_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext | None:
    """The HTTPS context (TLS 1.2+), or ``None`` when ``cert`` is empty."""
    if not cert:
        return None
    if not key:
        raise ConfigError("Config key metrics.tls_key: tls_cert and tls_key must be set together.")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=b"")  # never prompt on a terminal for an encrypted key
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"Config key metrics.tls_cert: cannot load the certificate {cert} with the key {key} "
            f"(PEM, unencrypted key): {exc}."
        ) from exc
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"Config key metrics.tls_client_ca: cannot load the CA file {client_ca}: {exc}.") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Conn(Connection):
    """One accepted connection: its socket, its state and where it stands against its deadline.

    Every field is read and written under the server's table lock. ``deadline`` is the
    :func:`time.monotonic` time by which the connection must have sent its whole request
    (or read its response); ``None`` while the handler computes an answer. ``since`` is
    when it began waiting for the current request (eviction picks the smallest).
    """

    __slots__ = ("state",)

    def __init__(self, sock: socket.socket, peer: str, state: str, now: float, idle_timeout_s: float) -> None:
        super().__init__(sock, peer, now=now, deadline=now + idle_timeout_s)
        self.state = state

    @property
    def expired(self) -> bool:
        """Shut down by the reaper, by eviction or by close()."""
        return self.ended is not None

    @property
    def evicted(self) -> bool:
        """Its slot went to a newcomer: the thread must not give it back."""
        return self.ended == EVICTED


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    server_version = "medge"
    sys_version = ""

    def __init__(self, request: socket.socket, client_address: Any, server: "_Server", conn: _Conn) -> None:
        self.conn = conn
        self.served = 0
        super().__init__(request, client_address, server)

    def handle_one_request(self) -> None:
        # The first request's deadline runs from the accept (the TLS handshake included); each
        # later one's from the end of the previous response. The per-read socket timeout stays.
        if self.served and not self.server.transition(self.conn, _WAITING, deadline=True):
            self.close_connection = True
            return
        self.served += 1
        super().handle_one_request()

    def parse_request(self) -> bool:
        # A request line cut short by the deadline (EOF) must not be parsed, let alone answered
        # (``GET /metrics`` alone is a valid HTTP/0.9 request).
        if self.conn.expired or not super().parse_request():
            self.close_connection = True
            return False
        if self.conn.expired or not self._discard_body():  # headers cut short by the deadline
            self.close_connection = True
            return False
        if not self.server.transition(self.conn, _BUSY, deadline=False):
            self.close_connection = True
            return False
        return True

    def _discard_body(self) -> bool:
        """Read and drop a small body (still under the request's deadline), or answer an error."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.send_error(400, "Request bodies need a Content-Length")
            return False
        lengths = {v.strip() for v in self.headers.get_all("Content-Length", [])}
        if not lengths:
            return True
        length = lengths.pop()
        if lengths or not (length.isascii() and length.isdigit()):
            self.send_error(400, "Bad Content-Length")
            return False
        size = int(length)
        if size > _MAX_DISCARDED_BODY:
            self.send_error(413, f"Request bodies are limited to {_MAX_DISCARDED_BODY} bytes")
            return False
        while size > 0:
            chunk = self.rfile.read(min(size, 16384))
            if not chunk:  # EOF: the peer went away, or the deadline shut the connection down
                return False
            size -= len(chunk)
        return True

    def end_headers(self) -> None:
        # Writing an answer has its own deadline: a peer that does not read cannot hold the
        # connection (SSLSocket.sendall's timeout is per send, not total). An error answer to an
        # unfinished request (400, 413, 100 Continue) stays under the request's deadline.
        if self.conn.state == _BUSY:
            self.server.transition(self.conn, _WRITING, deadline=True)
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        headers: dict[str, str] = {}
        try:
            code, body, ctype, headers = self._answer(path)
        except Exception as exc:  # noqa: BLE001 - the HTTP handler's one error boundary: count, answer 500, go on
            self.server.boundary.report(exc, f"GET {path if path in _ROUTES else 'other path'}")
            code, body, ctype = 500, b"internal error: see the daemon's log\n", _TEXT
        self._send(code, body, ctype, headers)

    def _answer(self, path: str) -> tuple[int, bytes, str, dict[str, str]]:
        auth = self.server.auth
        if auth is not None and not auth.check(self.headers.get("Authorization"), str(self.client_address[0])):
            held = self.server.throttle.due("auth")
            if held is not None:
                _log.warning(
                    "Refused an HTTP request from %s without valid basic-auth credentials%s.",
                    self.client_address[0], _more(held),
                )
            return 401, b"unauthorized\n", _TEXT, {"WWW-Authenticate": _REALM}
        if path == "/metrics":
            return self._metrics()
        if path == "/healthz":
            return 200, self._healthz(), _TEXT, {}
        if path == "/readyz":
            if self.server.ready():
                return 200, b"ready\n", _TEXT, {}
            why = self.server.reason() if self.server.reason is not None else ""
            return 503, (f"not ready: {why}\n" if why else "not ready\n").encode("utf-8"), _TEXT, {}
        return 404, b"not found: try /metrics, /healthz or /readyz\n", _TEXT, {}

    def _healthz(self) -> bytes:
        """``ok``, then the details lines, if any: a failing details call is counted and leaves ``ok`` alone."""
        details = self.server.details
        if details is None:
            return b"ok\n"
        try:
            text = details().strip("\n")
        except Exception as exc:  # noqa: BLE001 - liveness must answer 200 whatever the details do
            self.server.boundary.report(exc, "GET /healthz details")
            text = ""
        return ("ok\n" + (text + "\n" if text else "")).encode("utf-8", "replace")

    def _metrics(self) -> tuple[int, bytes, str, dict[str, str]]:
        """The registry in the format the ``Accept`` header asks for, gzipped if accepted."""
        encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            return 200, gzip.compress(body), ctype, {"Content-Encoding": "gzip"}
        return 200, body, ctype, {}

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str]) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # The request line and status only: headers (Authorization) are never logged.
        _log.debug("http %s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # close() shuts connections down itself instead of waiting for them
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        addr: tuple[str, int],
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        *,
        ssl_context: ssl.SSLContext | None,
        auth: HtpasswdAuth | None,
        idle_timeout_s: float,
        max_connections: int,
        reason: Callable[[], str] | None = None,
        details: Callable[[], str] | None = None,
    ) -> None:
        super().__init__(addr, _Handler)
        self.registry = registry
        self.ready = ready
        self.reason = reason
        self.details = details
        self.ssl_context = ssl_context
        self.auth = auth
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.boundary = ErrorBoundary("http", _log, registry)
        self.throttle = LogThrottle(None, 60.0)
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        # The table's lock (and condition, for the reaper) guards the connections, their states and counts.
        self._table: ConnectionTable[_Conn] = ConnectionTable()
        self._slots_used = 0  # connections holding a slot (an evicted one's thread gave its slot away)
        self._admitted: _Conn | None = None  # verify_request -> process_request, both in the accept loop
        self._reaper = threading.Thread(target=self._reap, name="medge-http-reaper", daemon=True)
        self._reaper.start()

    def active(self) -> int:
        return len(self._table)

    # -------------------------------------------------------------------------------- admission
    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a slot; when none is free, evict the connection waiting longest for its request;
        when every connection is busy answering, refuse (the caller closes the socket at once)."""
        peer = str(client_address[0])
        now = time.monotonic()
        state = _HANDSHAKE if self.ssl_context is not None else _WAITING
        with self._table.lock:
            victim: _Conn | None = None
            refused = False
            if self._slots_used >= self.max_connections:
                # An evicted thread ends at once (its socket is shut down); the cap keeps even a
                # flood of newcomers from running more than twice max_connections threads.
                if len(self._table) < 2 * self.max_connections:
                    # its slot goes to the newcomer
                    victim = self._table.evict_oldest(lambda c: c.state in (_HANDSHAKE, _WAITING))
                if victim is not None:
                    self.evicted += 1
                else:
                    refused = True
                    self.refused += 1
            else:
                self._slots_used += 1
            if not refused:
                self._admitted = self._table.add(_Conn(request, peer, state, now, self.idle_timeout_s))
        if refused:
            held = self.throttle.due("full")
            if held is not None:
                _log.warning(
                    "HTTP connection from %s closed at accept: %d connections are open and all busy "
                    "(metrics.max_connections)%s.",
                    peer, self.max_connections, _more(held),
                )
            return False
        if victim is not None:
            held = self.throttle.due("evict")
            if held is not None:
                _log.warning(
                    "HTTP connection from %s closed to make room for a new one: %d connections are open "
                    "(metrics.max_connections) and it had waited %.1f s for a complete request%s.",
                    victim.peer, self.max_connections, now - victim.since, _more(held),
                )
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        conn, self._admitted = self._admitted, None
        assert conn is not None and conn.sock is request
        thread = threading.Thread(
            target=self.process_request_thread, args=(conn, client_address), name="medge-http-conn", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            self._release(conn)  # no thread started: the slot would leak
            raise

    def process_request_thread(self, conn: _Conn, client_address: Any) -> None:  # type: ignore[override]
        sock: socket.socket = conn.sock
        try:
            # The reaper enforces the deadline (and counts it); the per-read timeout is only a backstop
            # for a late reaper, so it must not win the race on a busy machine.
            sock.settimeout(self.idle_timeout_s + 5.0)
            if self.ssl_context is not None:
                # The handshake happens here, in this connection's thread and under the request's
                # deadline: a peer that connects and stalls (or trickles) holds one slot until then.
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                self._swap(conn, sock)
                sock.do_handshake()
                if not self.transition(conn, _WAITING, deadline=False):
                    return
            _Handler(sock, client_address, self, conn)
        except ssl.SSLError as exc:
            if not conn.expired:
                held = self.throttle.due("tls")
                if held is not None:
                    _log.warning(
                        "TLS handshake with %s failed: %s%s.", client_address[0], exc.reason or exc, _more(held)
                    )
        except OSError as exc:  # the peer went away, stalled, or missed its deadline
            _log.debug("HTTP connection from %s ended: %s.", client_address[0], exc)
        except Exception as exc:  # noqa: BLE001 - the connection loop's error boundary
            self.boundary.report(exc, "connection")
        finally:
            self._release(conn)  # untracked first: the reaper never touches a closed socket
            self.shutdown_request(sock)

    def _release(self, conn: _Conn) -> None:
        with self._table.lock:
            self._table.remove(conn)
            if not conn.evicted:
                self._slots_used -= 1

    def _swap(self, conn: _Conn, sock: socket.socket) -> None:
        """The connection's socket is now ``sock`` (TLS-wrapped); the deadline follows it."""
        self._table.swap(conn, sock)  # shut at once if it expired while the raw socket was handed over

    # -------------------------------------------------------------------------------- deadlines
    def transition(self, conn: _Conn, state: str, *, deadline: bool) -> bool:
        """Move ``conn`` to ``state``, with a fresh deadline or none; ``False`` if it has expired.

        Entering ``_WAITING`` with a deadline restarts the wait (keep-alive); entering it from the
        TLS handshake keeps the accept's deadline and wait time."""
        with self._table.lock:
            if conn.expired:
                return False
            now = time.monotonic()
            if state == _WAITING and deadline:
                conn.since = now
            conn.state = state
            if deadline:
                conn.deadline = now + self.idle_timeout_s
                self._table.lock.notify()
            elif state != _WAITING:
                conn.deadline = None
            return True

    def _reap(self) -> None:
        """Shut down every connection whose deadline has passed; sleep until the next deadline."""
        table = self._table
        with table.lock:
            while not table.stopping:
                now = time.monotonic()
                expired, nearest = table.expire_due(now)  # their threads' blocked reads or writes return now
                for conn in expired:
                    self.timed_out += 1
                    _log.debug(
                        "HTTP connection from %s closed: no complete %s within %.1f s (metrics.idle_timeout_s).",
                        conn.peer, "response read" if conn.state == _WRITING else "request",
                        self.idle_timeout_s,
                    )
                table.lock.wait(None if nearest is None else nearest - now)

    def shutdown_connections(self) -> None:
        """Stop the reaper and shut every open connection down, so that the threads serving them end now."""
        self._table.shutdown_all()
        self._reaper.join(timeout=2.0)


class HealthServer:
    """A small threaded HTTP(S) server (started on construction) for metrics and probes.

    Parameters
    ----------
    host, port : str, int
        Where to listen; port 0 picks a free one (see :attr:`port`).
    registry : CollectorRegistry
        What ``/metrics`` exposes; ``medge_internal_errors_total`` is added to it.
    ready : callable
        Returns whether ``/readyz`` answers 200.
    reason : callable, optional
        Returns why not, for the 503 body (component and cause; never request data).
    details : callable, optional
        Returns lines added to ``/healthz``'s body after ``ok`` (the daemon's capture status lines).
    tls_cert, tls_key : str, optional
        PEM certificate (chain) and unencrypted key: serve HTTPS (TLS 1.2+).
    tls_client_ca : str, optional
        PEM CA bundle: require a client certificate signed by it (needs TLS).
    basic_auth_file : str, optional
        htpasswd file of bcrypt hashes: every endpoint requires basic auth.
    idle_timeout_s : float
        Time for a whole request (TLS handshake, request line, headers, small body), from the
        accept or the end of the previous response, and for writing a response; a connection
        that misses it is closed.
    max_connections : int
        Connections served at once; a newcomer beyond them evicts the one waiting longest for
        its request, or is closed at accept when all are busy answering.

    Raises
    ------
    ConfigError
        If a TLS file or the htpasswd file cannot be used.
    OSError
        If the address cannot be bound.

    See Also
    --------
    HealthServer.from_config : the same from ``[metrics]``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        *,
        tls_cert: str = "",
        tls_key: str = "",
        tls_client_ca: str = "",
        basic_auth_file: str = "",
        idle_timeout_s: float = 10.0,
        max_connections: int = 32,
        reason: Callable[[], str] | None = None,
        details: Callable[[], str] | None = None,
    ) -> None:
        if tls_client_ca and not tls_cert:
            raise ConfigError("Config key metrics.tls_client_ca: needs metrics.tls_cert and tls_key.")
        if not idle_timeout_s > 0:
            raise ConfigError(f"Config key metrics.idle_timeout_s: {idle_timeout_s} must be > 0.")
        if max_connections < 1:
            raise ConfigError(f"Config key metrics.max_connections: {max_connections} must be >= 1.")
        ssl_context = _server_ssl_context(tls_cert, tls_key, tls_client_ca)
        auth = HtpasswdAuth(basic_auth_file) if basic_auth_file else None
        self._server = _Server(
            (host, port),
            registry,
            ready,
            ssl_context=ssl_context,
            auth=auth,
            idle_timeout_s=float(idle_timeout_s),
            max_connections=int(max_connections),
            reason=reason,
            details=details,
        )
        self.host = host
        self.port = int(self._server.server_address[1])
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="medge-http", daemon=True)
        self._thread.start()
        extras = [
            "TLS" if ssl_context is not None else "",
            "client certificates required" if tls_client_ca else "",
            f"basic auth for {len(auth.users)} user(s)" if auth is not None else "",
        ]
        _log.info(
            "Metrics and health on %s (/metrics, /healthz, /readyz; %s).",
            self.url,
            ", ".join(e for e in extras if e) or "no TLS, no auth",
        )
        if host not in _LOOPBACK and (ssl_context is None or auth is None):
            _log.warning(
                "Metrics and health listen on %s without %s: anyone who can reach the port can read them "
                "(set metrics.tls_cert, tls_key and basic_auth_file; see docs/operations.md).",
                host,
                "TLS or basic auth" if ssl_context is None and auth is None else "TLS" if ssl_context is None else "basic auth",
            )

    @staticmethod
    def check_files(config: Any) -> list[str]:
        """What ``[metrics]``'s TLS and htpasswd files would make the server do, checked without binding.

        Loads the certificate, key and client CA into a TLS context and parses
        the htpasswd file, as :meth:`from_config` does; returns lines such as
        ``"TLS"``, ``"basic auth for 1 user(s)"``.

        Raises
        ------
        ConfigError
            A file :meth:`from_config` would refuse (``medge serve --check``
            and ``medge doctor`` passed such files while ``serve`` refused
            them, until 2026-12-01).
        """
        if not config.enabled:
            return []
        if config.tls_client_ca and not config.tls_cert:
            raise ConfigError("Config key metrics.tls_client_ca: needs metrics.tls_cert and tls_key.")
        ssl_context = _server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca)
        auth = HtpasswdAuth(config.basic_auth_file) if config.basic_auth_file else None
        return [
            line
            for line in (
                "TLS" if ssl_context is not None else "",
                "client certificates required" if config.tls_client_ca else "",
                f"basic auth for {len(auth.users)} user(s)" if auth is not None else "",
            )
            if line
        ]

    @classmethod
    def from_config(
        cls,
        config: Any,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        reason: Callable[[], str] | None = None,
        details: Callable[[], str] | None = None,
    ) -> "HealthServer":
        """Start a server as ``[metrics]`` (an :class:`edge.config.MetricsConfig`) says."""
        return cls(
            config.host,
            config.port,
            registry,
            ready,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            tls_client_ca=config.tls_client_ca,
            basic_auth_file=config.basic_auth_file,
            idle_timeout_s=config.idle_timeout_s,
            max_connections=config.max_connections,
            reason=reason,
            details=details,
        )

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9108`` (``https://`` with TLS)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def active_connections(self) -> int:
        """Connections being served now (each holds one thread)."""
        return self._server.active()

    @property
    def refused_connections(self) -> int:
        """Connections closed at accept because ``max_connections`` were open and all busy."""
        return self._server.refused

    @property
    def evicted_connections(self) -> int:
        """Connections closed, while waiting for their request, to make room for a newcomer."""
        return self._server.evicted

    @property
    def timed_out_connections(self) -> int:
        """Connections closed for missing their deadline (request, handshake or response)."""
        return self._server.timed_out

    def close(self) -> None:
        """Stop serving, close the listening socket and every open connection."""
        self._server.shutdown()
        self._server.server_close()
        self._server.shutdown_connections()
        self._thread.join(timeout=2.0)

    def __enter__(self) -> "HealthServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
