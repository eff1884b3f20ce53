"""``medge serve``: run the daemon until SIGTERM or SIGINT.

Argument parsing, signal handling and wiring only: the daemon itself, its
start-up order, readiness, the systemd notifications and watchdog, and the
test-only fault injection are in :mod:`edge.daemon`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from edge.config import load_config
from edge.daemon import Daemon, FAULT_INJECT_ENV, Watchdog, end_process, exit_after, inject_fault, sd_notify
from edge.inference.model import ModelRegistry

__all__ = ["configure_parser", "run"]

_log = logging.getLogger(__name__)


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
        from edge.ops.health import HealthServer

        metrics = HealthServer.check_files(config.metrics)  # TLS and htpasswd files, as serve loads them
        if metrics:
            print(f"metrics: {', '.join(metrics)}")
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
    fault = os.environ.get(FAULT_INJECT_ENV, "")  # test-only; read once, here
    interval_s = Watchdog.interval_from_env()
    with Daemon(config) as daemon:
        release = inject_fault(daemon, fault) if fault else None
        watchdog = None
        if not stop.is_set():  # a SIGTERM during start-up (loading, warm-up): never READY=1, shut down now
            sd_notify("READY=1")
            watchdog = Watchdog(lambda: daemon.ready, interval_s).start() if interval_s else None
            if watchdog is not None:
                _log.info(
                    "systemd watchdog: WATCHDOG=1 every %.1f s while every serving loop makes progress.", interval_s
                )
            while not stop.wait(0.5):
                pass
        _log.info("%s received; shutting down.", received[0] if received else "stop")
        if watchdog is not None:
            watchdog.stop()
        sd_notify("STOPPING=1")
        if release is not None:
            release.set()  # a batch hung by fault injection returns, so shutdown stays bounded
        exit_after(config.shutdown_timeout_s + 0.9)
    return end_process(daemon, 0)  # os._exit(0) here if a capture thread is still blocked in FFmpeg
