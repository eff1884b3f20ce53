"""The metrics/health HTTP server under hostile or careless peers: idle sockets, connection floods,
TLS (server and client certificates), basic auth, a failing collector, and a real Prometheus
scraping it over HTTPS with basic auth."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import select
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.config import MetricsConfig
from edge.errors import ConfigError
from edge.ops.health import HealthServer
from edge.ops.http_auth import HtpasswdAuth
from tests.conftest import peer_path
from tests.conftest import wait_until as poll  # the one deadline poll of the suite
from tests.edge import dicom_factory as f
from tests.edge._pki import Pki, make_pki

PROMETHEUS = peer_path("prometheus") or "prometheus"
USER, PASSWORD = "prom", "correct horse battery"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(
    url: str, *, context: ssl.SSLContext | None = None, authorization: str | None = None, timeout: float = 5.0
) -> tuple[int, bytes, http.client.HTTPMessage]:
    req = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def client_context(pki: Pki, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


def htpasswd(path: Path, user: str = USER, password: str = PASSWORD) -> Path:
    """An htpasswd file as ``htpasswd -nbB`` writes it (``$2y$`` prefix)."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"# made by the tests\n{user}:$2y${hashed[4:]}\n")
    return path


def internal_errors(reg: CollectorRegistry) -> float:
    return reg.get_sample_value("medge_internal_errors_total", {"component": "http"}) or 0.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def connect(port: int, opened: list[socket.socket], send: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened.append(s)
    if send:
        s.sendall(send)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed ``s`` (EOF or reset) within the socket's timeout."""
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------------------------------------- bounds
def test_idle_connections_are_closed_after_the_idle_timeout(sockets: list[socket.socket]) -> None:
    """50 idle sockets (half of them stuck mid request line) each hold a thread only until the idle
    timeout; a normal GET is answered while they sit; then threads and connections are back to baseline."""
    baseline = threading.active_count()
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: True, idle_timeout_s=3, max_connections=64) as srv:
        for i in range(50):
            connect(srv.port, sockets, b"GET /metr" if i % 2 else b"")
        poll(lambda: srv.active_connections == 50, what="the server to accept all 50 connections")
        assert get(srv.url + "/healthz")[0] == 200  # served while they sit
        poll(lambda: srv.active_connections == 0, what="idle connections to be closed")
        poll(lambda: threading.active_count() <= baseline + 2, what="connection threads to end")  # +2: listener, reaper
        assert all(closed_by_server(s) for s in sockets)
        assert get(srv.url + "/healthz")[0] == 200


def test_connections_beyond_max_connections_are_closed_at_accept_when_every_slot_is_busy(
    sockets: list[socket.socket],
) -> None:
    """With every slot serving a request (nothing to evict), newcomers are closed at accept."""
    release = threading.Event()
    entered = threading.Semaphore(0)

    def ready() -> bool:  # /readyz blocks: its connection is busy, not waiting for a request
        entered.release()
        return release.wait(10)

    baseline = threading.active_count()
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=ready, idle_timeout_s=30, max_connections=4) as srv:
        held = [connect(srv.port, sockets, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n") for _ in range(4)]
        for _ in range(4):
            assert entered.acquire(timeout=10), "a /readyz request to reach the handler"
        extra = [connect(srv.port, sockets) for _ in range(16)]
        assert all(closed_by_server(s) for s in extra)  # closed at once, not after the 30 s idle timeout
        assert srv.refused_connections == 16 and srv.evicted_connections == 0
        assert srv.active_connections == 4 and threading.active_count() <= baseline + 2 + 4  # + listener, reaper
        release.set()
        for s in held:
            assert s.recv(1024).startswith(b"HTTP/1.1 200 ")
            s.close()
        poll(lambda: srv.active_connections == 0, what="the held connections to end")
        assert get(srv.url + "/healthz")[0] == 200


def test_a_full_server_evicts_the_connection_waiting_longest_for_its_request(sockets: list[socket.socket]) -> None:
    """Idle or half-sent connections hold every slot: a newcomer evicts the oldest of them and is served."""
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: True, idle_timeout_s=30, max_connections=4) as srv:
        oldest = connect(srv.port, sockets, b"GET /metr")
        poll(lambda: srv.active_connections == 1, what="the first connection to be accepted")
        rest = [connect(srv.port, sockets, b"GET /health") for _ in range(3)]
        poll(lambda: srv.active_connections == 4, what="4 connections to hold every slot")
        status, body, _ = get(srv.url + "/healthz", timeout=5)  # would be refused at accept without eviction
        assert (status, body) == (200, b"ok\n")
        assert closed_by_server(oldest)
        assert srv.evicted_connections == 1 and srv.refused_connections == 0
        poll(lambda: srv.active_connections == 3, what="the scrape's connection to end")
        for s in rest:  # the others keep their slots and can still finish their request
            s.sendall(b"z HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200 ")


def _closed_now(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (EOF or reset pending), without blocking; TLS too
    (a TLS 1.3 session ticket is read and is not a close)."""
    timeout = s.gettimeout()
    s.settimeout(0)
    try:
        return s.recv(1024) == b""
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    except OSError:
        return True
    finally:
        s.settimeout(timeout)


def test_slow_drip_requests_are_closed_at_the_request_deadline_and_scrapes_get_in(
    sockets: list[socket.socket],
) -> None:
    """Slowloris: 32 connections (= max_connections) each send one byte of a request line per second,
    well inside the per-read idle timeout. Each must still be closed within idle_timeout_s (+1 s) of its
    first byte, and /metrics and /readyz answer while they drip."""
    idle = 2.0
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: True, idle_timeout_s=idle, max_connections=32) as srv:
        opened_at: dict[socket.socket, float] = {}
        for _ in range(32):
            s = connect(srv.port, sockets, b"G")
            opened_at[s] = time.monotonic()
        poll(lambda: srv.active_connections == 32, what="all 32 dripping connections to be accepted")
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(1.0):  # the attacker's pacing: one more byte per connection per second
                for s in list(opened_at):
                    try:
                        s.send(b"E")
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            status, body, _ = get(srv.url + "/metrics", timeout=idle)
            assert status == 200 and b"medge_internal_errors_total" in body
            assert get(srv.url + "/readyz", timeout=idle)[0] == 200
            closed_at: dict[socket.socket, float] = {}

            def all_closed() -> bool:
                open_ = [s for s in opened_at if s not in closed_at]
                readable = select.select(open_, [], [], 0)[0] if open_ else []
                now = time.monotonic()
                closed_at.update((s, now) for s in readable if _closed_now(s))
                return len(closed_at) == len(opened_at)

            poll(all_closed, timeout_s=idle + 4, what=f"the dripping connections to be closed ({len(closed_at)}/32)")
            slowest = max(closed_at[s] - opened_at[s] for s in opened_at)
            assert slowest <= idle + 1.0, f"a dripping connection stayed open {slowest:.2f} s"
        finally:
            stop.set()
            dripper.join(5)
        poll(lambda: srv.active_connections == 0, what="every connection thread to end")
        assert srv.evicted_connections >= 1  # the scrape took the slot of the oldest dripper
        assert srv.timed_out_connections + srv.evicted_connections == 32
        assert get(srv.url + "/healthz")[0] == 200


def test_keep_alive_connections_serve_several_requests_each_under_its_own_deadline() -> None:
    """The deadline restarts at the end of each response: a client asking every 0.4 s keeps its
    connection well past idle_timeout_s; once it stops asking, the idle connection is closed."""
    idle = 1.0
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: True, idle_timeout_s=idle) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        started = time.monotonic()
        port = None
        for i in range(8):
            conn.request("GET", ("/metrics", "/healthz", "/readyz")[i % 3])
            resp = conn.getresponse()
            assert resp.status == 200 and not resp.will_close
            resp.read()
            port = port or conn.sock.getsockname()[1]
            assert conn.sock.getsockname()[1] == port  # the same connection every time
            time.sleep(0.4)  # the client's pacing between scrapes
        assert time.monotonic() - started > 2 * idle
        assert srv.active_connections == 1
        poll(lambda: srv.active_connections == 0, timeout_s=idle + 2, what="the idle keep-alive connection to be closed")
        assert srv.timed_out_connections == 1
        conn.close()


def test_a_get_with_a_body_discards_the_body_and_keeps_the_connection_in_step() -> None:
    """A GET with a Content-Length body: the body is read and discarded, not parsed as the next request."""
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: True, idle_timeout_s=30) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=3)  # 3 s << the 30 s idle timeout
        conn.request("GET", "/healthz", body=b"hello")
        resp = conn.getresponse()
        assert (resp.status, resp.read(), resp.will_close) == (200, b"ok\n", False)
        port = conn.sock.getsockname()[1]
        conn.request("GET", "/readyz", body=b"x" * 60_000)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ready\n")
        conn.request("GET", "/readyz")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ready\n")
        assert conn.sock.getsockname()[1] == port  # one connection, still in step
        conn.close()

        for headers, code in (
            (b"Content-Length: 1000000000\r\n", 413),  # larger than the 64 KiB that would be discarded
            (b"Content-Length: lots\r\n", 400),
            (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
            (b"Transfer-Encoding: chunked\r\n", 400),
        ):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=3)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
            answer = b""
            while chunk := s.recv(4096):  # the server answers, then closes: EOF well before 3 s
                answer += chunk
            s.close()
            assert answer.startswith(b"HTTP/1.1 %d " % code), (headers, answer[:80])
            assert b"Connection: close" in answer
        poll(lambda: srv.active_connections == 0, what="the refused requests' connections to end")
        assert get(srv.url + "/healthz")[0] == 200


def test_tls_handshake_and_request_share_one_deadline(pki: Pki, sockets: list[socket.socket]) -> None:
    """Over TLS, (a) a ClientHello sent one byte per second and (b) a quick handshake followed by a request
    line sent one byte per second are both closed within idle_timeout_s (+1 s) of the connect, although
    every read gets a byte in time."""
    idle = 2.0
    with HealthServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: True,
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), idle_timeout_s=idle,
    ) as srv:
        raw = connect(srv.port, sockets)
        tls = client_context(pki).wrap_socket(socket.create_connection(("localhost", srv.port), timeout=5),
                                              server_hostname="localhost")
        sockets.append(tls)
        opened = time.monotonic()
        # a handshake record header announcing 512 bytes, then its body, one byte a second
        dripped = {raw: b"\x16\x03\x01\x02\x00" + b"\x01" * 8, tls: b"GET /metrics HTTP/1.1\r\n"}
        closed_at: dict[socket.socket, float] = {}
        for i in range(len(dripped[tls])):
            for s, data in dripped.items():
                if s in closed_at or i >= len(data):
                    continue
                try:
                    s.sendall(data[i : i + 1])
                except OSError:
                    closed_at[s] = time.monotonic()
            if len(closed_at) == 2 or time.monotonic() - opened > idle + 2:
                break
            ready = select.select([s for s in dripped if s not in closed_at], [], [], 1.0)[0]  # the pacing
            closed_at.update((s, time.monotonic()) for s in ready if _closed_now(s))
        assert set(closed_at) == {raw, tls}, "a dripping TLS connection is still open"
        assert max(closed_at.values()) - opened <= idle + 1.0
        poll(lambda: srv.active_connections == 0, what="the connection threads to end")
        assert srv.timed_out_connections == 2
        assert get(srv.url + "/healthz", context=client_context(pki))[0] == 200


# ---------------------------------------------------------------------------------------------- TLS
def test_https_and_a_stalled_handshake_does_not_block_the_listener(pki: Pki, sockets: list[socket.socket]) -> None:
    """Idle TCP connections to the TLS port never start their handshake; other clients are served at once."""
    with HealthServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: True,
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), idle_timeout_s=30,
    ) as srv:
        assert srv.url.startswith("https://")
        for _ in range(3):
            connect(srv.port, sockets)
        poll(lambda: srv.active_connections == 3, what="the idle connections to be accepted")
        conn = http.client.HTTPSConnection("localhost", srv.port, timeout=3, context=client_context(pki))
        conn.request("GET", "/healthz")  # would time out (3 s < 30 s) if the handshake ran in the accept loop
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok\n")
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        conn.close()
        # Plain HTTP on the TLS port is refused; the server keeps serving.
        with pytest.raises((OSError, http.client.HTTPException)):
            get(f"http://127.0.0.1:{srv.port}/healthz", timeout=3)
        assert get(srv.url + "/healthz", context=client_context(pki))[0] == 200


def test_client_certificate_is_required_when_tls_client_ca_is_set(pki: Pki, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path, "stranger")
    with HealthServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: True,
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca),
    ) as srv:
        assert get(srv.url + "/metrics", context=client_context(pki, cert=True))[0] == 200
        with pytest.raises((OSError, urllib.error.URLError, http.client.HTTPException)):
            get(srv.url + "/metrics", context=client_context(pki), timeout=3)  # no certificate
        wrong = client_context(pki)
        wrong.load_cert_chain(str(stranger.client_cert), str(stranger.client_key))
        with pytest.raises((OSError, urllib.error.URLError, http.client.HTTPException)):
            get(srv.url + "/metrics", context=wrong, timeout=3)  # signed by another CA
        assert get(srv.url + "/healthz", context=client_context(pki, cert=True))[0] == 200


def test_unusable_tls_or_htpasswd_files_are_config_errors(pki: Pki, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    with pytest.raises(ConfigError, match="metrics.tls_cert"):
        HealthServer("127.0.0.1", 0, reg, lambda: True, tls_cert=str(pki.ca), tls_key=str(pki.server_key))
    with pytest.raises(ConfigError, match="metrics.tls_client_ca"):
        HealthServer("127.0.0.1", 0, reg, lambda: True, tls_client_ca=str(pki.ca))
    md5 = tmp_path / "md5.htpasswd"
    md5.write_text("prom:$apr1$abc$0123456789abcdefghijkl\n")  # htpasswd -nbm: not bcrypt
    with pytest.raises(ConfigError, match="line 1"):
        HtpasswdAuth(md5)
    empty = tmp_path / "empty.htpasswd"
    empty.write_text("# nobody\n")
    with pytest.raises(ConfigError, match="holds no user"):
        HealthServer("127.0.0.1", 0, reg, lambda: True, basic_auth_file=str(empty))


@pytest.fixture
def bcrypt_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """``{"n": how many bcrypt checks ran}``, counted from here on."""
    calls = {"n": 0}
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls["n"] += 1
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def test_a_malformed_bcrypt_hash_or_an_unbounded_idle_timeout_is_a_config_error(tmp_path: Path) -> None:
    """A hash cut short (say by the shell expanding ``$``) failed every request with a bare 401; ``inf`` killed the server."""
    from edge.config import load_config

    short = tmp_path / "short.htpasswd"
    short.write_text("prom:$2b$12$short\n")
    with pytest.raises(ConfigError, match="line 1"):
        HtpasswdAuth(short)
    for value in ("inf", "1e10"):
        cfg = tmp_path / f"m-{value}.toml"
        cfg.write_text(f"[metrics]\nidle_timeout_s = {value}\n")
        with pytest.raises(ConfigError, match="idle_timeout_s"):
            load_config(cfg)


def test_repeated_failures_from_one_client_stop_costing_bcrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bcrypt_calls: dict[str, int]
) -> None:
    """32 clients sending wrong passwords kept every connection slot in bcrypt and a scraper was turned away."""
    from edge.ops import http_auth

    calls = bcrypt_calls
    auth = HtpasswdAuth(htpasswd(tmp_path / "h"))
    assert auth.check(basic(USER, PASSWORD), "10.0.0.9")  # verified once: cached from now on
    calls["n"] = 0
    for _ in range(3 * http_auth.FAILURES_BEFORE_THROTTLE):
        assert not auth.check(basic(USER, "wrong"), "10.0.0.1")
    assert calls["n"] == http_auth.FAILURES_BEFORE_THROTTLE  # then refused without a bcrypt
    assert not auth.check(basic(USER, "wrong"), "10.0.0.2") and calls["n"] == http_auth.FAILURES_BEFORE_THROTTLE + 1
    assert auth.check(basic(USER, PASSWORD), "10.0.0.1")  # cached credentials still pass from the throttled client
    later = time.monotonic() + http_auth.FAILURE_WINDOW_S + 1
    monkeypatch.setattr(http_auth.time, "monotonic", lambda: later)
    assert not auth.check(basic(USER, "wrong"), "10.0.0.1") and calls["n"] == http_auth.FAILURES_BEFORE_THROTTLE + 2


def test_a_non_ascii_authorization_header_is_401_not_500(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    with HealthServer("127.0.0.1", 0, reg, lambda: True, basic_auth_file=str(htpasswd(tmp_path / "h"))) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.putrequest("GET", "/metrics")
        conn.putheader("Authorization", "Basic \xe9\xe9\xe9\xe9")
        conn.endheaders()
        assert conn.getresponse().status == 401
        conn.close()
    assert internal_errors(reg) == 0


# ---------------------------------------------------------------------------------------------- basic auth
def test_basic_auth_guards_every_endpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edge.ops.health")
    reg = CollectorRegistry()
    good = basic(USER, PASSWORD)
    with HealthServer("127.0.0.1", 0, reg, lambda: True, basic_auth_file=str(htpasswd(tmp_path / "h"))) as srv:
        for path in ("/metrics", "/healthz", "/readyz", "/nope"):
            status, _body, headers = get(srv.url + path)
            assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="medge"', path
            assert get(srv.url + path, authorization=basic(USER, "wrong"))[0] == 401, path
            assert get(srv.url + path, authorization=good)[0] == (404 if path == "/nope" else 200), path
        hostile = [
            basic("nobody", PASSWORD),
            basic(USER, "x" * 100),  # past bcrypt's 72-byte limit
            "Basic !!!not-base64",
            "Basic " + base64.b64encode(b"no colon").decode(),
            "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
            "Bearer " + PASSWORD,
            "Basic",
        ]
        for header in hostile:
            assert get(srv.url + "/metrics", authorization=header)[0] == 401, header
        assert get(srv.url + "/metrics", authorization=good)[0] == 200
    assert internal_errors(reg) == 0  # hostile headers are refusals, not failures
    assert PASSWORD not in caplog.text and good.split()[1] not in caplog.text
    assert "Authorization" not in caplog.text


def test_successful_verifications_are_cached(tmp_path: Path, bcrypt_calls: dict[str, int]) -> None:
    calls = bcrypt_calls
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, basic_auth_file=str(htpasswd(tmp_path / "h"))) as srv:
        for _ in range(5):
            assert get(srv.url + "/metrics", authorization=basic(USER, PASSWORD))[0] == 200
        assert calls["n"] == 1  # one bcrypt, then the cached SHA-256
        for _ in range(3):
            assert get(srv.url + "/metrics", authorization=basic(USER, "wrong"))[0] == 401
        assert calls["n"] == 4  # failures are never cached
        assert get(srv.url + "/metrics", authorization=basic(USER, PASSWORD))[0] == 200
        assert calls["n"] == 4


# ---------------------------------------------------------------------------------------------- error boundary
class _FailsOnce(Collector):
    def __init__(self) -> None:
        self.failed = False

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("collector broke")
        yield GaugeMetricFamily("medge_test_value", "A test gauge.", value=1)


def test_a_failing_handler_answers_500_and_the_server_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    reg = CollectorRegistry()
    reg.register(_FailsOnce())
    with HealthServer("127.0.0.1", 0, reg, lambda: True) as srv:
        status, body, _ = get(srv.url + "/metrics")
        assert status == 500 and b"internal error" in body
        assert get(srv.url + "/healthz")[0] == 200
        status, body, _ = get(srv.url + "/metrics")
        assert status == 200 and b"medge_test_value 1.0" in body
        assert b'medge_internal_errors_total{component="http"} 1.0' in body
    assert "Unexpected RuntimeError in http (GET /metrics)" in caplog.text


def test_from_config_uses_the_metrics_section(pki: Pki, tmp_path: Path) -> None:
    cfg = MetricsConfig(
        host="127.0.0.1", port=0, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
        basic_auth_file=str(htpasswd(tmp_path / "h")), idle_timeout_s=5, max_connections=2,
    )
    with HealthServer.from_config(cfg, CollectorRegistry(), lambda: False) as srv:
        assert srv.url.startswith("https://")
        assert get(srv.url + "/readyz", context=client_context(pki))[0] == 401
        assert get(srv.url + "/readyz", context=client_context(pki), authorization=basic(USER, PASSWORD))[0] == 503


# ---------------------------------------------------------------------------------------------- real Prometheus
def _prometheus_config(path: Path, pki: Pki, guarded: int, mutual: int) -> None:
    def job(name: str, port: int, password: str, client_cert: bool) -> list[str]:
        tls = [f"      ca_file: {pki.ca}"]
        if client_cert:
            tls += [f"      cert_file: {pki.client_cert}", f"      key_file: {pki.client_key}"]
        return [
            f"  - job_name: {name}",
            "    scheme: https",
            "    tls_config:",
            *tls,
            "    basic_auth:",
            f"      username: {USER}",
            f"      password: {json.dumps(password)}",
            "    static_configs:",
            f"      - targets: ['localhost:{port}']",
        ]

    lines = [
        "global:",
        "  scrape_interval: 1s",
        "  scrape_timeout: 1s",
        "scrape_configs:",
        *job("good", guarded, PASSWORD, False),
        *job("badpw", guarded, "not the password", False),
        *job("mtls", mutual, PASSWORD, True),
    ]
    path.write_text("\n".join(lines) + "\n")


def _api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return json.loads(resp.read())


@pytest.mark.peer("prometheus", "promtool")
def test_real_prometheus_scrapes_over_https_with_basic_auth(pki: Pki, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    Counter("medge_test_events", "A test counter.", registry=reg).inc(7)
    auth = str(htpasswd(tmp_path / "htpasswd"))
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    with HealthServer("127.0.0.1", 0, reg, lambda: True, basic_auth_file=auth, **tls) as guarded, HealthServer(
        "127.0.0.1", 0, reg, lambda: True, basic_auth_file=auth, tls_client_ca=str(pki.ca), **tls
    ) as mutual:
        config = tmp_path / "prometheus.yml"
        _prometheus_config(config, pki, guarded.port, mutual.port)
        check = subprocess.run([peer_path("promtool") or "promtool", "check", "config", str(config)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        port = f.free_port()
        log = (tmp_path / "prometheus.log").open("w")
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            health: dict[str, tuple[str, str]] = {}

            def settled() -> bool:
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    targets = _api(port, "/api/v1/targets")["data"]["activeTargets"]
                except OSError:
                    return False  # not listening yet
                health.clear()
                health.update({t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets})
                return (
                    health.get("good", ("",))[0] == "up"
                    and health.get("mtls", ("",))[0] == "up"
                    and health.get("badpw", ("",))[0] == "down"
                )

            poll(settled, timeout_s=20, what=f"Prometheus to scrape the targets (last seen: {health})")
            assert "401" in health["badpw"][1]
            result = _api(port, "/api/v1/query?query=medge_test_events_total")["data"]["result"]
            assert {r["metric"]["job"]: float(r["value"][1]) for r in result} == {"good": 7.0, "mtls": 7.0}
        finally:
            prom.terminate()
            prom.wait(10)
            log.close()
