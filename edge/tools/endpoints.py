"""Plumbing shared by the client tools (``medge send``, ``medge bench``): endpoints and arguments.

Which daemon a client talks to
------------------------------
A client finds the daemon the way the daemon finds its own sockets, so that
on a host with several daemons (``medge@.service``) it reaches the one it is
pointed at, not whoever owns ``127.0.0.1:5555``. For each endpoint setting,
the first of these that has a value wins:

1. the command-line flag (``--endpoint``, ``--host``, ``--port``, ``--aet``);
2. the daemon's ``MEDGE_*`` environment variable (``MEDGE_ZMQ__INGEST``,
   ``MEDGE_DICOM__HOST``, ``MEDGE_DICOM__PORT``, ``MEDGE_DICOM__AE_TITLE``,
   ``MEDGE_ENGINES_DIR``), read by the daemon's own loader
   (:func:`edge.config.load_config`);
3. the daemon's config file given with ``--config FILE``;
4. the contract's default.

A wildcard bind address taken from the daemon's settings (``tcp://0.0.0.0:5555``,
``tcp://*:5555``, host ``0.0.0.0``) is connected to on loopback. Other
``MEDGE_*`` variables (the spool, metrics, TLS files ...) are the daemon's
business and are not read here.

Exit statuses and the ``HxW`` frame-size argument of every bench mode also
live here, so that the bench modes share them without importing each other;
their result files (``--json``, ``--csv``, ``--plot``) are written by
:func:`edge.tools.results.write_outputs`.

Examples
--------
>>> r = resolve_client_endpoints(None, env={"MEDGE_ZMQ__INGEST": "tcp://0.0.0.0:6000"})
>>> r.zmq_ingest.value, r.zmq_ingest.origin
('tcp://127.0.0.1:6000', 'MEDGE_ZMQ__INGEST')
>>> resolve_client_endpoints(None, env={}, endpoint="tcp://10.0.0.5:5555").zmq_ingest.origin
'--endpoint'
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edge.config import ENV_PREFIX, DicomConfig, ZmqConfig, load_config

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURES",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "parse_frame",
    "add_config_argument",
    "Setting",
    "ClientEndpoints",
    "resolve_client_endpoints",
    "connect_endpoint",
]

_log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# The daemon's variables a client honours: (section, key) -> variable name.
_ENV = {
    ("zmq", "ingest"): f"{ENV_PREFIX}ZMQ__INGEST",
    ("dicom", "host"): f"{ENV_PREFIX}DICOM__HOST",
    ("dicom", "port"): f"{ENV_PREFIX}DICOM__PORT",
    ("dicom", "ae_title"): f"{ENV_PREFIX}DICOM__AE_TITLE",
    ("", "engines_dir"): f"{ENV_PREFIX}ENGINES_DIR",
}
_WILDCARD_HOSTS = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "::1", "": "127.0.0.1"}


# ---------------------------------------------------------------------------- arguments
def parse_frame(text: str) -> tuple[int, int]:
    """``"480x640"`` -> ``(480, 640)`` (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is not HxW, e.g. 480x640") from exc
    if h < 16 or w < 16 or h * w > 8192 * 8192:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is out of range (16..8192 per side)")
    return h, w


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: take the daemon's endpoints from its config file."""
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="the daemon's config file (TOML): its endpoints are used unless a flag or the daemon's "
             "MEDGE_* environment variables say otherwise (flag > MEDGE_* > file > default)")


# ---------------------------------------------------------------------------- endpoints
@dataclass(frozen=True)
class Setting:
    """One resolved setting and where it came from (a flag, a variable, the file, or ``default``)."""

    value: Any
    origin: str


@dataclass(frozen=True)
class ClientEndpoints:
    """The daemon's endpoints as a client should use them."""

    zmq_ingest: Setting
    dicom_host: Setting
    dicom_port: Setting
    dicom_ae_title: Setting
    engines_dir: Setting
    zmq_curve: bool  # the daemon's settings require CURVE on its sockets

    def dicom_line(self) -> str:
        """``MEDGE@127.0.0.1:11112 (from ...)``: the DICOM peer and where each part came from."""
        parts = [("host", self.dicom_host), ("port", self.dicom_port), ("AE title", self.dicom_ae_title)]
        origins = {s.origin for _, s in parts}
        where = (f"from {origins.pop()}" if len(origins) == 1
                 else "; ".join(f"{name} from {s.origin}" for name, s in parts))
        return f"{self.dicom_ae_title.value}@{self.dicom_host.value}:{self.dicom_port.value} ({where})"

    def zmq_line(self) -> str:
        """``tcp://127.0.0.1:5555 (from ...)``."""
        return f"{self.zmq_ingest.value} (from {self.zmq_ingest.origin})"


def connect_endpoint(bind: str) -> str:
    """The address a client connects to for a daemon bound to ``bind`` (wildcards become loopback).

    >>> connect_endpoint("tcp://*:5555"), connect_endpoint("tcp://[::]:5555"), connect_endpoint("ipc:///run/m")
    ('tcp://127.0.0.1:5555', 'tcp://[::1]:5555', 'ipc:///run/m')
    """
    m = re.fullmatch(r"tcp://(\[[^\]]*\]|[^:]*):(\d+|\*)", bind)
    if not m or m.group(1) not in _WILDCARD_HOSTS:
        return bind
    return f"tcp://{_WILDCARD_HOSTS[m.group(1)]}:{m.group(2)}"


def _connect_host(host: str) -> str:
    return _WILDCARD_HOSTS.get(host, host)


def resolve_client_endpoints(config: Path | str | None, env: Mapping[str, str] | None = None, *,
                             endpoint: str | None = None, host: str | None = None, port: int | None = None,
                             ae_title: str | None = None, engines_dir: Path | None = None) -> ClientEndpoints:
    """Resolve the daemon's endpoints: flag > ``MEDGE_*`` > ``config`` file > default.

    Parameters
    ----------
    config : path-like, optional
        The daemon's TOML file (``--config``); read with the daemon's loader
        (models are not resolved, so no engines are needed).
    env : mapping, optional
        The environment (default ``os.environ``); only the variables named in
        the module docstring are read.
    endpoint, host, port, ae_title, engines_dir : optional
        The values given on the command line (``None``: not given).

    Raises
    ------
    edge.errors.ConfigError
        The file or one of the variables is invalid (the message names it).
    """
    from edge.inference.manifest import default_engines_dir

    environ = os.environ if env is None else env
    ours = {var: environ[var] for var in _ENV.values() if var in environ}
    cfg = load_config(config, env=ours, check_models=False)
    defaults = {"zmq": ZmqConfig(), "dicom": DicomConfig()}

    def pick(flag_value: Any, flag: str, section: str, key: str) -> Setting:
        if flag_value is not None:
            return Setting(flag_value, flag)
        have = getattr(getattr(cfg, section), key) if section else getattr(cfg, key)
        var = _ENV[(section, key)]
        if var in ours:
            return Setting(have, var)
        default = getattr(defaults[section], key) if section else default_engines_dir()
        if config is not None and have != default:
            return Setting(have, f"--config {config}")
        return Setting(have, "default")

    zmq_ep = pick(endpoint, "--endpoint", "zmq", "ingest")
    if zmq_ep.origin != "--endpoint":
        zmq_ep = Setting(connect_endpoint(zmq_ep.value), zmq_ep.origin)
    dicom_host = pick(host, "--host", "dicom", "host")
    if dicom_host.origin != "--host":
        dicom_host = Setting(_connect_host(dicom_host.value), dicom_host.origin)
    return ClientEndpoints(
        zmq_ingest=zmq_ep,
        dicom_host=dicom_host,
        dicom_port=pick(port, "--port", "dicom", "port"),
        dicom_ae_title=pick(ae_title, "--aet", "dicom", "ae_title"),
        engines_dir=pick(engines_dir, "--engines-dir", "", "engines_dir"),
        zmq_curve=cfg.zmq.curve_enabled,
    )
