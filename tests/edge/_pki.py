"""A throwaway test PKI made with the ``openssl`` command: a CA, a server and a client certificate.

The server certificate names ``localhost`` and ``127.0.0.1`` (subjectAltName),
so Go (Prometheus), DCMTK and Python all accept it for a loopback peer. Keys
are P-256 (fast to make). Without ``openssl`` the test skips (fails under ``CI=true``): :func:`tests.conftest.require_peer`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_peer

__all__ = ["Pki", "make_pki"]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]


@dataclass(frozen=True)
class Pki:
    """Paths of one test PKI's PEM files."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    exe = require_peer("openssl")  # to make test certificates
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


def _leaf(pki_dir: Path, ca: Path, ca_key: Path, name: str, cn: str, usage: str) -> tuple[Path, Path]:
    cert, key = pki_dir / f"{name}.pem", pki_dir / f"{name}.key"
    _openssl(
        "req", "-x509", "-CA", str(ca), "-CAkey", str(ca_key), *_EC, "-keyout", str(key), "-out", str(cert),
        "-subj", f"/CN={cn}",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext", f"extendedKeyUsage={usage}",
    )
    return cert, key


def make_pki(root: Path, name: str = "test") -> Pki:
    """Make a CA and a server and a client certificate it signed, under ``root/name``."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.pem", d / "ca.key"
    _openssl(
        "req", "-x509", *_EC, "-keyout", str(ca_key), "-out", str(ca), "-subj", f"/CN=medge {name} CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    server_cert, server_key = _leaf(d, ca, ca_key, "server", "localhost", "serverAuth")
    client_cert, client_key = _leaf(d, ca, ca_key, "client", "medge-client", "clientAuth")
    return Pki(ca, ca_key, server_cert, server_key, client_cert, client_key)
