"""``medge serve --config FILE`` as a child process, and the configuration it runs on.

Used by the demo, the tests and the benchmarks: :func:`write_demo_config`
writes a daemon configuration on loopback ports (:func:`free_port`),
:class:`DaemonProcess` starts the daemon on it, waits for ``/readyz`` and
stops it with SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from edge.errors import MedgeError

__all__ = ["free_port", "DaemonProcess", "write_demo_config"]

_log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _q(v: str | Path) -> str:
    """A TOML basic string (JSON escaping is valid TOML for these values)."""
    return json.dumps(str(v))


def write_demo_config(path: Path, *, engines_dir: Path, spool_dir: Path, models: list[str],
                      ports: dict[str, int], dicom: bool, precision: str, routes: dict[str, str],
                      results_port: int | None, results_aet: str = "MEDGEPACS") -> Path:
    """Write the daemon configuration the demo uses (TOML) and return its path."""
    lines = [
        "# written by medge demo",
        f"engines_dir = {_q(engines_dir)}",
        f"spool_dir = {_q(spool_dir)}",
        "shutdown_timeout_s = 4.0",
        "",
        "[zmq]",
        "ingest = " + _q("tcp://127.0.0.1:%d" % ports["ingest"]),
        "publish = " + _q("tcp://127.0.0.1:%d" % ports["publish"]),
        f"default_model = {_q(models[0])}",
        "",
        "[metrics]",
        'host = "127.0.0.1"',
        f"port = {ports['metrics']}",
        "",
        "[dicom]",
        f"enabled = {'true' if dicom else 'false'}",
        'host = "127.0.0.1"',
        f"port = {ports['dicom']}",
        'ae_title = "MEDGE"',
        "series_idle_s = 1.0",
    ]
    if dicom:
        for modality, model in routes.items():
            lines += ["", "[[dicom.routes]]", f"modality = {_q(modality)}", f"model = {_q(model)}"]
        if results_port is not None:
            lines += ["", "[[dicom.destinations]]", 'name = "demo-pacs"', 'host = "127.0.0.1"',
                      f"port = {results_port}", f"ae_title = {_q(results_aet)}"]
        lines += ["", "[outbox]", "retry_base_s = 0.5", "retry_max_s = 2.0"]
    for m in models:
        lines += ["", "[[models]]", f"name = {_q(m)}", f"precision = {_q(precision)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class DaemonProcess:
    """``medge serve --config FILE`` as a child process; a context manager.

    Its output goes to ``log_path``. :meth:`wait_ready` polls ``/readyz``.
    :meth:`stop` sends SIGTERM and waits (then kills, after ``kill_after_s``).
    """

    def __init__(self, config_path: Path, metrics_port: int, log_path: Path) -> None:
        self.metrics_port = metrics_port
        self.log_path = log_path
        self._log_fh = open(log_path, "wb")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "--log-level", "INFO", "serve", "--config", str(config_path)],
            stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        self.exit_code: int | None = None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the daemon's output."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Seconds until ``/readyz`` said 200; raises :class:`MedgeError` if the daemon exits or times out."""
        t0 = time.monotonic()
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise MedgeError(f"the daemon exited with status {self.proc.returncode} during start-up:\n"
                                 f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 - loopback
                    if resp.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise MedgeError(f"the daemon was not ready within {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _log.warning("The daemon did not stop within %.0f s of SIGTERM; killing it.", timeout_s)
                self.proc.kill()
                self.proc.wait(5)
        self.exit_code = self.proc.returncode
        self._log_fh.close()
        return int(self.exit_code)

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exit_code is None:
            self.stop()
