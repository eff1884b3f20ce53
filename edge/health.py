"""HTTP endpoints for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

* ``/metrics``: the Prometheus text exposition of the registry passed in.
* ``/healthz``: 200 while the process serves HTTP at all (liveness).
* ``/readyz``: 200 once every model is loaded and warmed up and the
  ingest sockets are bound; 503 before that and while shutting down
  (readiness: a load balancer or systemd watchdog should wait for it).

Examples
--------
>>> from prometheus_client import CollectorRegistry
>>> with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: True) as srv:
...     srv.port > 0
True
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HealthServer"]

_log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            if self.server.ready():
                self._send(200, b"ready\n")
            else:
                self._send(503, b"not ready\n")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        _log.debug("http %s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        super().__init__(addr, _Handler)
        self.registry = registry
        self.ready = ready


class HealthServer:
    """A small threaded HTTP server (started on construction) for metrics and probes.

    Parameters
    ----------
    host, port : str, int
        Where to listen; port 0 picks a free one (see :attr:`port`).
    registry : CollectorRegistry
        What ``/metrics`` exposes.
    ready : callable
        Returns whether ``/readyz`` answers 200.

    Raises
    ------
    OSError
        If the address cannot be bound.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self._server = _Server((host, port), registry, ready)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="medge-http", daemon=True)
        self._thread.start()
        _log.info("Metrics and health on http://%s:%d (/metrics, /healthz, /readyz).", host, self.port)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9108``."""
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)

    def __enter__(self) -> "HealthServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
