"""``medge doctor``: can this machine run the daemon as configured?

Checks, each ``ok``, ``warn`` or ``fail``:

* the configuration file (and ``MEDGE_*`` overrides) validates;
* Python packages: onnxruntime (and its execution providers), pyzmq,
  prometheus_client, pynetdicom/highdicom;
* GPU (:mod:`edge.tools.gpu_probe`): the driver and GPUs (NVML, else
  ``nvidia-smi``), which GPU gauges ``/metrics`` carries (NVML per gauge,
  or a Jetson's sysfs), cuda-python and the CUDA runtime, TensorRT, ONNX
  Runtime's GPU providers (a CUDA session is really created), and the
  TensorRT plans each model would load from the engine cache. Absent on a
  CPU-only machine: ``ok``, "not present"; ``warn`` where a model has
  ``backend = "auto"`` (it falls back); ``fail`` where a model names
  TensorRT or a GPU provider;
* engines: every served model's manifest loads and its artifacts' sha256
  match;
* ports: the ZeroMQ, metrics and DICOM addresses can be bound (``warn``
  when in use: a daemon may already be running);
* spool: the spool and engine-cache folders are writable (a file is
  written, fsynced, renamed and removed).

Exit status 0 when nothing failed, 1 otherwise. ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import secrets
from pathlib import Path

from edge.config import MedgeConfig, load_config
from edge.errors import ConfigError, MedgeError
from edge.fileio import atomic_write
from edge.tools.gpu_probe import Check, gpu_checks

__all__ = ["Check", "run_checks", "configure_parser", "run"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _packages() -> list[Check]:
    out = []
    for dist, required in (
        ("onnxruntime", True),
        ("pyzmq", True),
        ("prometheus-client", True),
        ("numpy", True),
        ("pynetdicom", False),
        ("highdicom", False),
    ):
        v = _version(dist)
        if v is None and dist == "onnxruntime":
            v = _version("onnxruntime-gpu")
        if v is None:
            out.append(Check(f"package {dist}", "fail" if required else "warn", "not installed"))
        else:
            out.append(Check(f"package {dist}", "ok", v))
    try:
        from edge.inference.backends.onnxruntime import available_providers

        out.append(Check("onnxruntime providers", "ok", ", ".join(available_providers())))
    except ImportError as exc:
        out.append(Check("onnxruntime providers", "fail", str(exc)))
    return out


def _engines(cfg: MedgeConfig) -> list[Check]:
    from edge.commands.engines import verify_manifest
    from edge.inference.manifest import Manifest

    out = []
    for mc in cfg.models:
        try:
            m = Manifest.load(cfg.model_dir(mc))
        except MedgeError as exc:
            out.append(Check(f"engine {mc.name}", "fail", str(exc)))
            continue
        res = verify_manifest(m)
        bad = {k: v for k, v in res.items() if v != "ok"}
        detail = f"v{m.version} {m.task}; artifacts " + ", ".join(f"{k}={v}" for k, v in res.items())
        out.append(Check(f"engine {mc.name}", "fail" if bad else "ok", detail))
    if not cfg.models:
        out.append(Check("engines", "fail", f"no models in {cfg.engines_dir}"))
    return out


def _bindable(host: str, port: int) -> tuple[bool, str]:
    if port == 0:
        return True, "ephemeral"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return False, str(exc)
    return True, "free"


def _tcp(endpoint: str) -> tuple[str, int] | None:
    if not endpoint.startswith("tcp://"):
        return None
    hostport = endpoint[len("tcp://") :]
    host, _, port = hostport.rpartition(":")
    if port == "*" or not port.isdigit():
        return None
    return (host.strip("[]") if host not in ("*", "") else "0.0.0.0"), int(port)


def _ports(cfg: MedgeConfig) -> list[Check]:
    targets: list[tuple[str, str, int]] = []
    if cfg.zmq.enabled:
        for key, ep in (("zmq.ingest", cfg.zmq.ingest), ("zmq.publish", cfg.zmq.publish)):
            hp = _tcp(ep)
            if hp:
                targets.append((key, *hp))
    if cfg.metrics.enabled:
        targets.append(("metrics.port", cfg.metrics.host, cfg.metrics.port))
    if cfg.dicom.enabled:
        targets.append(("dicom.port", cfg.dicom.host, cfg.dicom.port))
    out = []
    for key, host, port in targets:
        ok, why = _bindable(host, port)
        out.append(Check(f"port {key}", "ok" if ok else "warn", f"{host}:{port} {why if ok else 'in use: ' + why}"))
    return out


def _metrics_files(cfg: MedgeConfig) -> list[Check]:
    """``[metrics]``'s TLS and htpasswd files, loaded as ``medge serve`` loads them."""
    from edge.ops.health import HealthServer

    if not cfg.metrics.enabled:
        return []
    try:
        what = HealthServer.check_files(cfg.metrics)
    except ConfigError as exc:
        return [Check("metrics files", "fail", str(exc))]
    return [Check("metrics files", "ok", ", ".join(what) or "no TLS, no auth")]


def _writable(label: str, folder: Path) -> Check:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The daemon's own write path (edge.fileio): temp file, fsync, rename, folder fsync.
        probe = atomic_write(folder / f".doctor-{os.getpid()}-{secrets.token_hex(4)}.done", b"medge doctor\n")
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return Check(label, "fail", f"{folder}: {exc}")
    status = "ok" if free > 1 << 30 else "warn"
    return Check(label, status, f"{folder.resolve()} writable, {free / 2**30:.1f} GiB free")


def run_checks(config_path: Path | None) -> list[Check]:
    """Every check, in order (never raises for a failed check)."""
    checks: list[Check] = []
    cfg: MedgeConfig | None = None
    try:
        cfg = load_config(config_path)
        checks.append(Check("config", "ok", str(config_path) if config_path else "defaults (no file)"))
    except ConfigError as exc:
        checks.append(Check("config", "fail", str(exc)))
        try:
            cfg = load_config(config_path, check_models=False)
        except ConfigError:
            cfg = None
    checks.extend(_packages())
    checks.extend(gpu_checks(cfg))
    if cfg is not None:
        checks.extend(_engines(cfg))
        checks.extend(_ports(cfg))
        checks.extend(_metrics_files(cfg))
        checks.append(_writable("spool", cfg.spool_dir))
        checks.append(_writable("engine cache", cfg.engine_cache_dir))
    return checks


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``medge doctor``."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML configuration to check")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    """Print the checks; 1 if any failed."""
    checks = run_checks(args.config)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [c.__dict__ for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"[{c.status.upper():<4}] {c.name:<28} {c.detail}")
        print("doctor: " + ("problems found" if failed else "all required checks passed"))
    return 1 if failed else 0
