"""ZeroMQ CURVE: only clients whose public key is allow-listed get through, encrypted.

The daemon runs in-process on the tiny fixture engines with ``[zmq]
curve_server_key`` and ``curve_client_keys_dir``; the clients are plain
pyzmq sockets configured as docs/operations.md says (the daemon's public
key, the client's own key pair).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq
import zmq.auth

from edge.config import load_config
from edge.daemon import Daemon
from edge.errors import ConfigError
from edge.ops.curve import CurveClientKeys, create_keypair
from edge.tools.zmq_client import ZmqClient


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("curve")
    server_pub, server_secret = create_keypair(root / "server", "daemon")
    allowed_pub, allowed_secret = create_keypair(root / "clients", "probe-1")
    _, stranger_secret = create_keypair(root / "others", "stranger")
    return {
        "server_pub": server_pub,
        "server_secret": server_secret,
        "clients_dir": allowed_pub.parent,
        "allowed_secret": allowed_secret,
        "stranger_secret": stranger_secret,
    }


@pytest.fixture(scope="module")
def daemon(fixture_engines: Path, keys: dict[str, Path]) -> Iterator[Daemon]:
    env = {
        "MEDGE_ENGINES_DIR": str(fixture_engines),
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__DEFAULT_MODEL": "tiny-seg",
        "MEDGE_ZMQ__CURVE_SERVER_KEY": str(keys["server_secret"]),
        "MEDGE_ZMQ__CURVE_CLIENT_KEYS_DIR": str(keys["clients_dir"]),
        "MEDGE_METRICS__PORT": "0",
        "MEDGE_DICOM__ENABLED": "false",
    }
    with Daemon(load_config(None, env=env)) as d:
        yield d


def _request(req_id: str) -> list[bytes]:
    img = np.zeros((32, 32), np.uint8)
    img[8:24, 8:24] = 200
    hdr = {"v": 1, "id": req_id, "dtype": "uint8", "shape": [32, 32]}
    return [json.dumps(hdr).encode(), img.tobytes()]


def _dealer(ctx: zmq.Context, endpoint: str, server_pub: Path | None, client_secret: Path | None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if server_pub is not None and client_secret is not None:
        public, secret = zmq.auth.load_certificate(client_secret)
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = zmq.auth.load_certificate(server_pub)[0]
    s.connect(endpoint)
    return s


def test_allowed_client_gets_replies_and_results(daemon: Daemon, keys: dict[str, Path]) -> None:
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        public, secret = zmq.auth.load_certificate(keys["allowed_secret"])
        sub.curve_publickey, sub.curve_secretkey = public, secret
        sub.curve_serverkey = zmq.auth.load_certificate(keys["server_pub"])[0]
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(daemon.zmq.publish_endpoint)
        s = _dealer(ctx, daemon.zmq.ingest_endpoint, keys["server_pub"], keys["allowed_secret"])
        # A SUB only receives what is published after its subscription reached the daemon: retry until it does.
        got_pub = None
        for i in range(50):
            s.send_multipart(_request(f"a{i}"))
            assert s.poll(10_000), "an allow-listed CURVE client got no reply"
            reply = json.loads(s.recv_multipart()[0])
            assert reply["status"] == "ok" and reply["id"] == f"a{i}"
            if sub.poll(100):
                got_pub = sub.recv_multipart()
                break
        assert got_pub is not None, "an allow-listed CURVE subscriber received no result"
        assert json.loads(got_pub[1])["status"] == "ok"
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("who", ["stranger", "plaintext"])
def test_other_clients_get_nothing(daemon: Daemon, keys: dict[str, Path], who: str) -> None:
    ctx = zmq.Context()
    try:
        if who == "stranger":
            s = _dealer(ctx, daemon.zmq.ingest_endpoint, keys["server_pub"], keys["stranger_secret"])
        else:
            s = _dealer(ctx, daemon.zmq.ingest_endpoint, None, None)
        before = daemon.scheduler.accepted if daemon.scheduler else 0
        s.send_multipart(_request("x"), flags=zmq.NOBLOCK)
        assert not s.poll(1500), f"a {who} client got a reply from a CURVE daemon"
        assert (daemon.scheduler.accepted if daemon.scheduler else 0) == before
        # The allow-listed client is still served while the stranger hangs on.
        ok = _dealer(ctx, daemon.zmq.ingest_endpoint, keys["server_pub"], keys["allowed_secret"])
        ok.send_multipart(_request("still"))
        assert ok.poll(10_000) and json.loads(ok.recv_multipart()[0])["status"] == "ok"
    finally:
        ctx.destroy(linger=0)


def test_zmqclient_curve_keys(daemon: Daemon, keys: dict[str, Path]) -> None:
    img = np.full((16, 16), 128, np.uint8)
    with ZmqClient(daemon.zmq.ingest_endpoint, context=zmq.Context.instance(),
                   curve=CurveClientKeys(keys["server_pub"], keys["allowed_secret"])) as c:
        rep = c.request(img, timeout_s=10.0, req_id="zc")
    assert rep.status == "ok"


def test_curve_config_errors(tmp_path: Path, keys: dict[str, Path], fixture_engines: Path) -> None:
    base = {"MEDGE_ENGINES_DIR": str(fixture_engines)}
    with pytest.raises(ConfigError, match="curve_client_keys_dir"):
        load_config(None, env={**base, "MEDGE_ZMQ__CURVE_SERVER_KEY": str(keys["server_secret"])})
    with pytest.raises(ConfigError, match="curve_server_key"):
        load_config(None, env={**base, "MEDGE_ZMQ__CURVE_SERVER_KEY": str(tmp_path / "nope")})
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = load_config(None, env={**base, "MEDGE_ZMQ__CURVE_SERVER_KEY": str(keys["server_secret"]),
                                 "MEDGE_ZMQ__CURVE_CLIENT_KEYS_DIR": str(empty),
                                 "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*", "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
                                 "MEDGE_METRICS__ENABLED": "false", "MEDGE_DICOM__ENABLED": "false"})
    with pytest.raises(ConfigError, match="no client public key"):
        Daemon(cfg).start()
    # The public half is not a server key pair.
    cfg2 = load_config(None, env={**base, "MEDGE_ZMQ__CURVE_SERVER_KEY": str(keys["server_pub"]),
                                  "MEDGE_ZMQ__CURVE_CLIENT_KEYS_DIR": str(keys["clients_dir"]),
                                  "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*", "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
                                  "MEDGE_METRICS__ENABLED": "false", "MEDGE_DICOM__ENABLED": "false"})
    with pytest.raises(ConfigError, match="no secret key"):
        Daemon(cfg2).start()


def test_medge_keys_command(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge.cli", "keys", "viewer", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    public, secret = zmq.auth.load_certificate(tmp_path / "viewer.key_secret")
    assert secret and public == zmq.auth.load_certificate(tmp_path / "viewer.key")[0]
    assert (tmp_path / "viewer.key_secret").stat().st_mode & 0o077 == 0
