"""A real Prometheus server (Debian's ``prometheus`` binary) on a free loopback port, for tests.

Examples
--------
>>> with PrometheusServer(config_text, tmp_path) as prom:  # doctest: +SKIP
...     prom.wait_for(lambda: prom.query("up") != [], what="a first scrape")
...     prom.query("medge_ready")
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from edge.tools.daemon_process import free_port
from tests.conftest import peer_path, wait_until

__all__ = ["PrometheusServer"]


class PrometheusServer:
    """``prometheus`` with ``config_text`` as its configuration, its storage under ``workdir``.

    The config is checked with ``promtool check config`` first; the server
    is ready once ``/-/ready`` answers 200. Tests that use it carry
    ``@pytest.mark.peer("prometheus", "promtool")``.
    """

    def __init__(self, config_text: str, workdir: Path, *, start_timeout_s: float = 30.0) -> None:
        prometheus, promtool = peer_path("prometheus"), peer_path("promtool")
        if prometheus is None or promtool is None:
            raise RuntimeError("prometheus and promtool are needed (Debian package prometheus).")
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(config_text, encoding="utf-8")
        check = subprocess.run([promtool, "check", "config", str(self.config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self._proc = subprocess.Popen(
            [prometheus, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            self.wait_for(self._ready, timeout_s=start_timeout_s, what="Prometheus to answer /-/ready")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_for(self, cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
        """``tests.conftest.wait_until``, failing at once with the server's log if it exits."""

        def alive_and(cond_: Callable[[], bool] = cond) -> bool:
            assert self._proc.poll() is None, f"prometheus exited: {self.log_path.read_text()}"
            return cond_()

        wait_until(alive_and, timeout_s=timeout_s, what=what, interval_s=0.02)

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``; the ``data`` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (``at``: evaluation time, Unix seconds)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def close(self) -> None:
        """Stop the server."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._log.close()

    def __enter__(self) -> "PrometheusServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
