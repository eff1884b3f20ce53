"""``medge serve``: the daemon.

Start-up, in order: read and validate the configuration (a bad one stops
here with a message naming the key); start the HTTP server (``/healthz``
answers at once, ``/readyz`` says 503); load, verify and warm up every
model; start the scheduler; bind the ZeroMQ sockets; start the DICOM SCP
(``[dicom] enabled``); then ``/readyz`` answers 200.

Under systemd (``Type=notify``) it sends ``READY=1`` once ready and
``STOPPING=1`` when it starts shutting down.

Shutdown on SIGTERM or SIGINT, within ``shutdown_timeout_s`` plus about a
second: stop accepting (new ZeroMQ requests are answered ``overloaded``),
stop the DICOM side, let the scheduler answer every accepted frame, send
the last replies, close the sockets, exit 0.

Examples
--------
Run it in-process (tests, notebooks):

>>> from edge.config import load_config
>>> with Daemon(load_config()) as daemon:  # doctest: +SKIP
...     daemon.zmq.ingest_endpoint
'tcp://127.0.0.1:5555'
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from edge.config import MedgeConfig, load_config
from edge.health import HealthServer
from edge.ingest.zmq import ZmqServer
from edge.metrics import Metrics
from edge.models import ModelRegistry
from edge.scheduler import Scheduler
from edge.zmq_auth import CurveServer

__all__ = ["Daemon", "configure_parser", "run", "sd_notify"]

_log = logging.getLogger(__name__)


class Daemon:
    """Everything ``medge serve`` runs, as one context manager.

    Parameters
    ----------
    config : MedgeConfig
        Validated configuration.
    registry : CollectorRegistry, optional
        Metrics registry (default: a fresh one; never the global default).

    Attributes
    ----------
    health : HealthServer or None
    models : ModelRegistry
    scheduler : Scheduler
    zmq : ZmqServer or None
    dicom : object or None
        What ``edge.ingest.dicom.start_dicom`` returned.
    ready_s : float
        Seconds from :meth:`start` to ready.
    """

    def __init__(self, config: MedgeConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.health: HealthServer | None = None
        self.models = ModelRegistry()
        self.scheduler: Scheduler | None = None
        self.zmq: ZmqServer | None = None
        self.dicom: Any = None
        self._zmq_ctx: zmq.Context | None = None
        self._curve: CurveServer | None = None
        self._ready = False
        self._stopped = False
        self.ready_s = 0.0

    @property
    def ready(self) -> bool:
        """Models loaded and warm, sockets bound, every serving loop alive, not shutting down."""
        return self._ready and not self.unhealthy()

    def unhealthy(self) -> list[str]:
        """Names of the components whose serving threads have died (empty when all serve).

        A component that lost its loop answers nothing (or only
        ``overloaded``); ``/readyz`` then says 503 so a load balancer or an
        operator sees it, instead of a daemon that looks ready and is not.
        """
        bad = []
        for name, part in (("scheduler", self.scheduler), ("zmq", self.zmq), ("dicom", self.dicom)):
            check = getattr(part, "healthy", None)
            if part is not None and callable(check):
                try:
                    ok = bool(check())
                except Exception:  # noqa: BLE001 - a probe must answer, whatever the component does
                    _log.exception("Health check of %s failed.", name)
                    ok = False
                if not ok:
                    bad.append(name)
        return bad

    def start(self) -> "Daemon":
        """Bring everything up; on failure, close what was started and re-raise."""
        t0 = time.perf_counter()
        cfg = self.config
        try:
            if cfg.metrics.enabled:
                try:
                    self.health = HealthServer.from_config(cfg.metrics, self.registry, lambda: self.ready)
                except OSError as exc:
                    from edge.errors import ConfigError

                    raise ConfigError(
                        f"Config key metrics.port: cannot listen on {cfg.metrics.host}:{cfg.metrics.port}: {exc}."
                    ) from exc
            self.models = ModelRegistry.from_config(cfg, warmup=True)
            for m in self.models:
                self.metrics.model_info.labels(
                    model=m.name, version=m.version, backend=m.backend_label, precision=m.precision
                ).set(1)
                self.metrics.queue_depth.labels(model=m.name).set(0)
            self.scheduler = Scheduler(
                self.models,
                cfg.scheduler,
                self.metrics,
                default_model=cfg.default_model,
                model_configs={m.name: m for m in cfg.models},
            ).start()
            if cfg.zmq.enabled:
                self._zmq_ctx = zmq.Context(io_threads=1)
                if cfg.zmq.curve_enabled:
                    self._curve = CurveServer(
                        self._zmq_ctx, cfg.zmq.curve_server_key, cfg.zmq.curve_client_keys_dir
                    ).start()
                    self._curve.secure_context()  # the ROUTER and PUB sockets created next are CURVE servers
                self.zmq = ZmqServer(cfg.zmq, self.scheduler, self.metrics, context=self._zmq_ctx).start()
            if cfg.dicom.enabled:
                self.dicom = _start_dicom(cfg, self.scheduler, self.registry)
        except BaseException:
            self.close()
            raise
        self.ready_s = time.perf_counter() - t0
        self._ready = True
        _log.info(
            "medge ready in %.2f s: models %s; zmq %s; dicom %s; metrics %s.",
            self.ready_s,
            ", ".join(f"{m.name} ({m.backend_label}, {m.precision})" for m in self.models),
            self.zmq.ingest_endpoint if self.zmq else "off",
            f"{cfg.dicom.host}:{cfg.dicom.port}" if self.dicom is not None else "off",
            self.health.url if self.health else "off",
        )
        return self

    def close(self) -> None:
        """Graceful shutdown: stop accepting, answer in-flight frames, close everything."""
        if self._stopped:
            return
        self._stopped = True
        self._ready = False
        t0 = time.monotonic()
        budget = self.config.shutdown_timeout_s
        if self.zmq is not None:
            self.zmq.stop_accepting()
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
        if self.dicom is not None:
            try:
                self.dicom.close()
            except Exception:  # error boundary of shutdown: the rest must still close
                _log.exception("Closing the DICOM side failed.")
        # Budget: queued frames get what is left minus 2 s; a batch inside the backend 0.8 s
        # more; the last replies up to budget - 0.6 s; then a 0.5 s socket linger.
        if self.scheduler is not None:
            self.scheduler.close(timeout_s=max(0.3, budget - 2.0 - (time.monotonic() - t0)), grace_s=0.8)
        if self.zmq is not None:
            self.zmq.close(timeout_s=max(0.3, budget - 0.6 - (time.monotonic() - t0)))
        if self._curve is not None:
            self._curve.stop()
        if self._zmq_ctx is not None:
            # Sockets are closed with their linger by now; destroy never waits on a socket left open.
            self._zmq_ctx.destroy(linger=0)
        if self.health is not None:
            self.health.close()
        self.models.close()
        if self.scheduler is not None:
            _log.info(
                "medge stopped in %.2f s: %d frames accepted, %d answered.",
                time.monotonic() - t0,
                self.scheduler.accepted,
                self.scheduler.answered,
            )

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def sd_notify(message: str) -> bool:
    """Tell systemd (``Type=notify``) about our state, e.g. ``READY=1``; a no-op elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        _log.warning("sd_notify(%s) failed: %s", message, exc)
        return False
    return True


def _start_dicom(cfg: MedgeConfig, service: Scheduler, registry: CollectorRegistry) -> Any:
    """Start the DICOM side through ``edge.ingest.dicom.start_dicom`` where it is installed."""
    if importlib.util.find_spec("edge.ingest.dicom") is None:
        _log.warning("[dicom] is enabled but edge.ingest.dicom is not installed; DICOM is off.")
        return None
    from edge.ingest.dicom import start_dicom

    return start_dicom(cfg, service, registry, cfg.spool_dir)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``medge serve``."""
    parser.description = (
        "Run the medge daemon: ZeroMQ (and DICOM) ingest, inference, results, metrics. "
        "With no --config it serves every bundled model on the defaults "
        "(ZeroMQ tcp://127.0.0.1:5555 / PUB :5556, DICOM 127.0.0.1:11112, metrics http://127.0.0.1:9108). "
        "MEDGE_<SECTION>__<KEY> environment variables override the file (see docs/configuration.md)."
    )
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration, load and warm up the models, print a summary and exit",
    )


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean shutdown."""
    config = load_config(args.config)
    if getattr(args, "check", False):
        with ModelRegistry.from_config(config) as models:
            for m in models:
                print(f"{m.name} v{m.version}: {m.task}, {m.backend_label}, {m.precision}, max batch {m.max_batch}")
        print("configuration OK")
        return 0
    stop = threading.Event()
    received: list[str] = []

    def _on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)
    with Daemon(config):
        sd_notify("READY=1")
        while not stop.wait(0.5):
            pass
        _log.info("%s received; shutting down.", received[0] if received else "stop")
        sd_notify("STOPPING=1")
        _exit_after(config.shutdown_timeout_s + 0.9)
    return 0


def _exit_after(seconds: float) -> None:
    """Last resort of a bounded shutdown: if closing takes longer than ``seconds``, exit now.

    Every component closes within its share of ``shutdown_timeout_s``; this
    guards against one that cannot (a thread stuck in a library call). What
    was accepted durably (spooled DICOM, the outbox) is on disk and is picked
    up at the next start; ZeroMQ clients get no reply, as with a crash.
    """

    def _expire() -> None:
        _log.error("Shutdown did not finish within %.1f s; exiting without waiting further.", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, _expire)
    timer.daemon = True
    timer.start()
