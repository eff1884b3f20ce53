"""systemd's notify protocol: ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1`` and ``EXTEND_TIMEOUT_USEC``.

A unit with ``Type=notify`` passes ``$NOTIFY_SOCKET`` to its main process;
each message is one datagram on that socket (sd_notify(3)). Outside systemd
the variable is unset and every function here is a no-op that returns
False, so library code may call them unconditionally.

``EXTEND_TIMEOUT_USEC=<n>`` asks systemd for ``n`` more microseconds before
it gives up on the current state (start-up, here): the daemon sends it while
it builds or waits for a TensorRT engine (:func:`build_progress`, called by
the engine cache's heartbeat), so a first build that takes minutes on a
Jetson is not killed by ``TimeoutStartSec=``. It must be repeated before
each extension runs out: the heartbeat sends one every
:data:`HEARTBEAT_S`, each asking for :data:`EXTEND_S`.

Examples
--------
>>> sd_notify("READY=1", env={})
False
>>> extend_timeout(60, env={})
False
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

__all__ = ["sd_notify", "extend_timeout", "build_progress", "EXTEND_S", "HEARTBEAT_S"]

_log = logging.getLogger(__name__)

#: Seconds each ``EXTEND_TIMEOUT_USEC`` asks for while an engine is built.
EXTEND_S = 60.0
#: Seconds between two ``EXTEND_TIMEOUT_USEC`` messages (well inside :data:`EXTEND_S`).
HEARTBEAT_S = 15.0


def sd_notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd (``Type=notify``) about our state, e.g. ``READY=1``; a no-op elsewhere.

    Parameters
    ----------
    message : str
        One or more ``KEY=VALUE`` lines.
    env : mapping, optional
        Where to find ``NOTIFY_SOCKET`` (default ``os.environ``).

    Returns
    -------
    bool
        True when the datagram was sent.
    """
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET")
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


def extend_timeout(seconds: float, env: Mapping[str, str] | None = None) -> bool:
    """Ask systemd for ``seconds`` more before the current state times out (``EXTEND_TIMEOUT_USEC``)."""
    usec = max(1, int(seconds * 1_000_000))
    return sd_notify(f"EXTEND_TIMEOUT_USEC={usec}", env=env)


def build_progress(phase: str) -> None:
    """The engine cache's default progress hook: keep systemd's start-up timeout from expiring.

    Called with ``"waiting"`` (another process holds the engine's lock),
    ``"building"`` and then every :data:`HEARTBEAT_S` while either lasts.
    """
    extend_timeout(EXTEND_S)
