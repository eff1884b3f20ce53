"""``medge keys``: make a ZeroMQ CURVE key pair for the daemon or a client.

Writes ``NAME.key`` (the public key: give it to the other side) and
``NAME.key_secret`` (public + secret key, mode 0600: keep it where it is).
See docs/operations.md, *Deploying on a hospital network*.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.ops.curve import create_keypair

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``medge keys``."""
    parser.description = (
        "Write a ZeroMQ CURVE key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600). "
        "The daemon uses its .key_secret as [zmq] curve_server_key; each client's NAME.key goes into "
        "the folder named by [zmq] curve_client_keys_dir; clients need the daemon's .key."
    )
    parser.add_argument("name", help="key pair name, e.g. 'daemon' or 'probe-1'")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to write the files (default: here)")


def run(args: argparse.Namespace) -> int:
    """Write the pair and say where it went."""
    public, secret = create_keypair(args.dir, args.name)
    print(f"public key (share it): {public}")
    print(f"secret key (keep it, mode 0600): {secret}")
    return 0
