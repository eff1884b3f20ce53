"""DICOM TLS on the outbox's side: the client context of one destination.

PS3.15 B.1, for a destination with ``tls = true``: the association runs over
TLS 1.2 or newer; the server certificate is verified against ``tls_ca``
(empty: the system's CA store) and its name against ``tls_server_name``
(empty: ``host``); ``tls_cert`` + ``tls_key`` are presented as a client
certificate when the peer asks for one (a key is never prompted for a
passphrase). :class:`ClientTls` loads the files when asked for a context
and again whenever one of them changes on disk, so a renewed certificate or
CA is picked up without a restart.

pynetdicom logs and swallows the TLS error of a failed association; the
context remembers it (:attr:`ClientContext.last_error`) so the outbox can
say why a destination failed (handshake refused, certificate not trusted,
name mismatch, client certificate refused). What the outbox does about it
(a transient failure: retried with backoff, never dead-lettered) is in
:mod:`edge.egress.dicom.outbox`.

Examples
--------
>>> from types import SimpleNamespace
>>> peer = SimpleNamespace(host="pacs.example", tls_ca="", tls_cert="", tls_key="", tls_server_name="")
>>> tls = ClientTls(peer)
>>> tls.server_hostname, tls.context().minimum_version.name, tls.context() is tls.context()
('pacs.example', 'TLSv1_2', True)
"""

from __future__ import annotations

import os
import ssl
from typing import Any, Protocol

__all__ = ["TlsPeer", "ClientContext", "ClientTls"]


class TlsPeer(Protocol):
    """What :class:`ClientTls` reads of a destination (``edge.egress.dicom.outbox.Destination``)."""

    @property
    def host(self) -> str: ...

    @property
    def tls_ca(self) -> str: ...

    @property
    def tls_cert(self) -> str: ...

    @property
    def tls_key(self) -> str: ...

    @property
    def tls_server_name(self) -> str: ...


class _RecordingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that notes its TLS error on its context: pynetdicom logs and swallows it."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            _note_tls_error(self.context, exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # TLS 1.3: a client certificate the peer refuses shows up on the first read, not in the handshake.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            _note_tls_error(self.context, exc)
            raise


class ClientContext(ssl.SSLContext):
    """The TLS client context of one destination; remembers the last TLS error seen on it.

    ``last_error`` is ``"TLS failed: <detail>"`` after a TLS error on one of
    its sockets; the caller clears it before each association.
    """

    sslsocket_class = _RecordingSSLSocket
    last_error: str = ""


def _note_tls_error(ctx: ssl.SSLContext, exc: ssl.SSLError) -> None:
    """Keep ``exc`` as a sentence on ``ctx`` when it is a :class:`ClientContext`."""
    if isinstance(ctx, ClientContext):
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = f"certificate verify failed ({str(exc.verify_message).rstrip('.')})"
        else:
            detail = exc.reason or type(exc).__name__  # e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED
        ctx.last_error = f"TLS failed: {detail}"


class ClientTls:
    """Builds the TLS context of a destination and rebuilds it when one of its files changes.

    Parameters
    ----------
    dest : TlsPeer
        The destination: ``host`` and its ``tls_*`` settings.
    """

    def __init__(self, dest: TlsPeer) -> None:
        self.dest = dest
        self.server_hostname = dest.tls_server_name or dest.host
        self._files = [p for p in (dest.tls_ca, dest.tls_cert, dest.tls_key) if p]
        self._stamp: tuple[Any, ...] | None = None
        self._ctx: ClientContext | None = None

    def _files_stamp(self) -> tuple[Any, ...]:
        """Path, mtime, size and inode of each file (None for one that cannot be read)."""
        out: list[Any] = []
        for p in self._files:
            try:
                st = os.stat(p)
                out.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((p, None))
        return tuple(out)

    def context(self) -> ClientContext:
        """The context for the next association (raises ``ssl.SSLError``/``OSError`` if a file is unusable)."""
        stamp = self._files_stamp()
        if self._ctx is None or stamp != self._stamp:
            self._ctx = self._build()
            self._stamp = stamp
        return self._ctx

    def _build(self) -> ClientContext:
        """A fresh context from the destination's files."""
        d = self.dest
        ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if d.tls_ca:
            ctx.load_verify_locations(cafile=d.tls_ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if d.tls_cert:
            ctx.load_cert_chain(d.tls_cert, d.tls_key or None, password=b"")  # never prompt for a passphrase
        return ctx
