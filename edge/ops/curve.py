"""ZeroMQ CURVE: authenticated, encrypted ZeroMQ for the daemon and its clients.

ZeroMQ's CURVE mechanism (RFC 26, CurveZMQ) encrypts every message and
authenticates both ends with Curve25519 key pairs. Keys live in ZeroMQ's
certificate files (the format of ``zmq.auth.create_certificates`` and of
libzmq's ``zcert``): ``NAME.key`` holds the public key only,
``NAME.key_secret`` holds the public and the secret key. ``medge keys``
writes such a pair.

On the daemon (``[zmq] curve_server_key``): the ROUTER and the PUB socket
become CURVE servers with the daemon's key pair, and a ZAP handler
(pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`) admits only clients
whose public key is among the ``*.key`` files in ``[zmq]
curve_client_keys_dir``. A client with another key, or without CURVE,
completes no handshake: it never reaches the protocol layer and gets no
reply. Keys are read at start-up; restart the daemon after changing them.

A client needs the daemon's *public* key file and its own key pair:
:class:`CurveClientKeys` applies them to a socket (``medge send zmq
--curve-server-key daemon.key --curve-client-key viewer.key_secret``).

Examples
--------
>>> import tempfile, zmq
>>> d = tempfile.mkdtemp()
>>> pub, secret = create_keypair(d, "daemon")
>>> keys = CurveClientKeys(server_public_file=pub, client_secret_file=create_keypair(d, "probe")[1])
>>> sock = zmq.Context.instance().socket(zmq.DEALER)
>>> keys.apply(sock)
>>> sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
True
>>> sock.close(0)
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edge.errors import ConfigError

__all__ = [
    "CurveServer",
    "CurveClientKeys",
    "create_keypair",
    "load_public_key",
    "load_secret_key",
    "add_curve_arguments",
    "curve_from_args",
]

_log = logging.getLogger(__name__)


def create_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) into ``directory``.

    Returns
    -------
    (public_file, secret_file)
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(d, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_public_key(path: str | os.PathLike[str], key: str = "") -> bytes:
    """The public key (Z85) of a certificate file (either kind)."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key or 'CURVE key'}: cannot read a ZeroMQ certificate from {path}: {exc}.") from exc
    return public


def load_secret_key(path: str | os.PathLike[str], key: str = "") -> tuple[bytes, bytes]:
    """``(public, secret)`` of a ``.key_secret`` certificate file.

    Raises
    ------
    ConfigError
        When the file cannot be read or holds no secret key (naming ``key``).
    """
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key or 'CURVE key'}: cannot read a ZeroMQ certificate from {path}: {exc}.") from exc
    if not secret:
        raise ConfigError(
            f"{key or 'CURVE key'}: {path} holds no secret key (use the .key_secret file that 'medge keys' wrote)."
        )
    return public, secret


class CurveServer:
    """The daemon's CURVE key pair and its ZAP allow-list of client keys.

    Parameters
    ----------
    context : zmq.Context
        The context whose sockets it secures (ZAP is per context).
    server_key_file : path-like
        ``.key_secret`` certificate of the daemon (``[zmq] curve_server_key``).
    client_keys_dir : path-like
        Folder of allowed clients' public ``*.key`` files (``[zmq] curve_client_keys_dir``).

    Raises
    ------
    ConfigError
        From :meth:`start`: unreadable keys, or a folder with no client key.
    """

    def __init__(
        self, context: zmq.Context, server_key_file: str | os.PathLike[str], client_keys_dir: str | os.PathLike[str]
    ) -> None:
        self._ctx = context
        self._server_key_file = Path(server_key_file)
        self._clients_dir = Path(client_keys_dir)
        self._auth: ThreadAuthenticator | None = None
        self.public_key = b""
        self._secret_key = b""
        self.allowed_clients = 0

    def start(self) -> "CurveServer":
        """Load the keys and start the ZAP handler thread."""
        self.public_key, self._secret_key = load_secret_key(self._server_key_file, "Config key zmq.curve_server_key")
        allowed = sorted(self._clients_dir.glob("*.key"))
        for p in allowed:
            load_public_key(p, "Config key zmq.curve_client_keys_dir")
        if not allowed:
            raise ConfigError(
                f"Config key zmq.curve_client_keys_dir: {self._clients_dir} holds no client public key (*.key); "
                "no client could connect."
            )
        self.allowed_clients = len(allowed)
        auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("edge.ops.curve.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(self._clients_dir))
        self._auth = auth
        _log.info("ZeroMQ CURVE on: %d allowed client key(s) from %s.", len(allowed), self._clients_dir)
        return self

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server with the daemon's key pair (before bind)."""
        for opt, value in self._options():
            sock.setsockopt(opt, value)

    def secure_context(self) -> None:
        """Make every socket the context creates from now on a CURVE server (pyzmq's context defaults).

        Call after :meth:`start` (the ZAP handler's own sockets must stay plain).
        """
        for opt, value in self._options():
            self._ctx.setsockopt(opt, value)

    def _options(self) -> list[tuple[int, object]]:
        return [
            (zmq.CURVE_SECRETKEY, self._secret_key),
            (zmq.CURVE_PUBLICKEY, self.public_key),
            (zmq.CURVE_SERVER, 1),
            (zmq.ZAP_DOMAIN, b"*"),
        ]

    def stop(self) -> None:
        """Stop the ZAP handler thread."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


@dataclass(frozen=True)
class CurveClientKeys:
    """What a client needs for CURVE: the daemon's public key and its own key pair.

    Parameters
    ----------
    server_public_file : path-like
        The daemon's ``.key`` (or ``.key_secret``) certificate file.
    client_secret_file : path-like
        The client's ``.key_secret`` certificate file (its public key must
        be in the daemon's ``curve_client_keys_dir``).
    """

    server_public_file: str | os.PathLike[str]
    client_secret_file: str | os.PathLike[str]

    def apply(self, sock: zmq.Socket) -> None:
        """Configure ``sock`` as a CURVE client (before connect)."""
        server_public = load_public_key(self.server_public_file, "--curve-server-key")
        public, secret = load_secret_key(self.client_secret_file, "--curve-client-key")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public


def add_curve_arguments(parser: argparse.ArgumentParser) -> None:
    """``--curve-server-key`` / ``--curve-client-key`` for client commands (send, bench)."""
    g = parser.add_argument_group("CURVE (a daemon with [zmq] curve_server_key)")
    g.add_argument("--curve-server-key", type=Path, default=None, metavar="FILE",
                   help="the daemon's public key file (NAME.key from 'medge keys')")
    g.add_argument("--curve-client-key", type=Path, default=None, metavar="FILE",
                   help="this client's key pair (NAME.key_secret; its NAME.key must be in the daemon's allow-list)")


def curve_from_args(args: argparse.Namespace) -> CurveClientKeys | None:
    """The client keys named on the command line, or ``None`` (both or neither must be given)."""
    server = getattr(args, "curve_server_key", None)
    client = getattr(args, "curve_client_key", None)
    if server is None and client is None:
        return None
    if server is None or client is None:
        raise ConfigError("--curve-server-key and --curve-client-key must be given together.")
    return CurveClientKeys(server, client)
