"""A real ``medge serve`` child process on ephemeral loopback ports, for client tests."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from edge.tools.daemon_process import DaemonProcess, free_port, write_demo_config


@contextmanager
def running_daemon(engines_dir: Path, workdir: Path, models: list[str], *, dicom: bool = False,
                   routes: dict[str, str] | None = None, results_port: int | None = None,
                   precision: str = "fp32") -> Iterator[SimpleNamespace]:
    """Start the daemon, wait for /readyz, yield its endpoints, stop it (SIGTERM)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("ingest", "publish", "metrics", "dicom")}
    cfg = write_demo_config(workdir / "medge.toml", engines_dir=engines_dir, spool_dir=workdir / "spool",
                            models=models, ports=ports, dicom=dicom, precision=precision,
                            routes=routes or {}, results_port=results_port)
    proc = DaemonProcess(cfg, ports["metrics"], workdir / "daemon.log")
    try:
        proc.wait_ready(60.0)
        yield SimpleNamespace(
            endpoint=f"tcp://127.0.0.1:{ports['ingest']}",
            metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
            dicom_port=ports["dicom"],
            proc=proc,
        )
    finally:
        proc.stop()
