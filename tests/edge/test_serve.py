"""``medge serve`` as a real process: readiness, promtool on /metrics, SIGTERM mid-stream, CLI tools."""

from __future__ import annotations

import argparse

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq

from edge.inference.manifest import default_engines_dir
from edge.tools.daemon_process import free_port
from tests.conftest import peer_path

BUNDLED = ("us-lesion-seg", "xray-nodule-det")
PROMTOOL = peer_path("promtool") or "promtool"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Served:
    """A ``medge serve`` subprocess with its ports."""

    def __init__(self, tmp_path: Path, env_extra: dict[str, str], config: Path | None = None) -> None:
        zin, zpub, http, dicom = (free_port() for _ in range(4))
        self.ingest = f"tcp://127.0.0.1:{zin}"
        self.publish = f"tcp://127.0.0.1:{zpub}"
        self.http = f"http://127.0.0.1:{http}"
        env = {
            **os.environ,
            "MEDGE_ZMQ__INGEST": self.ingest,
            "MEDGE_ZMQ__PUBLISH": self.publish,
            "MEDGE_METRICS__PORT": str(http),
            "MEDGE_DICOM__PORT": str(dicom),
            "MEDGE_SPOOL_DIR": str(tmp_path / "spool"),
            **env_extra,
        }
        cmd = [sys.executable, "-m", "edge.cli", "serve"] + (["--config", str(config)] if config else [])
        self.log_path = tmp_path / "serve.log"
        self._log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp_path)

    def wait_ready(self, timeout: float = 15.0) -> float:
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"medge serve exited early ({self.proc.returncode}):\n{self.log()}")
            if _status(self.http + "/readyz") == 200:
                return time.monotonic() - self.t0
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


HAVE_BUNDLED = all((default_engines_dir() / n / "manifest.json").is_file() for n in BUNDLED)


@pytest.fixture
def served(tmp_path: Path, fixture_engines: Path) -> Iterator[Served]:
    cfg = tmp_path / "medge.toml"
    cfg.write_text(f'engines_dir = "{fixture_engines}"\n[dicom]\nenabled = false\n[zmq]\ndefault_model = "tiny-seg"\n')
    s = Served(tmp_path, {}, config=cfg)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(params=["fixture", "bundled"])
def served_any(request: pytest.FixtureRequest, tmp_path: Path, fixture_engines: Path) -> Iterator[Served]:
    """A daemon on the fixture models, or with no config on the bundled ones (DICOM on)."""
    if request.param == "fixture":
        cfg: Path | None = tmp_path / "medge.toml"
        cfg.write_text(f'engines_dir = "{fixture_engines}"\n[dicom]\nenabled = false\n[zmq]\ndefault_model = "tiny-seg"\n')
        env: dict[str, str] = {}
    else:
        if not HAVE_BUNDLED:
            pytest.skip("the bundled engines are not built yet (trainer)")
        cfg, env = None, {"MEDGE_ENGINES_DIR": str(default_engines_dir())}
    s = Served(tmp_path, env, config=cfg)
    try:
        yield s
    finally:
        s.stop()


def _req(i: int, img: np.ndarray) -> list[bytes]:
    hdr = {"v": 1, "id": i, "stream": "probe-1", "dtype": str(img.dtype), "shape": list(img.shape)}
    return [json.dumps(hdr).encode(), img.tobytes()]


def test_sigterm_during_a_60fps_stream(served_any: Served) -> None:
    served = served_any
    ready_s = served.wait_ready()
    assert ready_s <= 5.0, f"ready after {ready_s:.2f} s"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(served.ingest)
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 255, (480, 640), dtype=np.uint8) for _ in range(4)]
    replies: dict[int, dict] = {}
    sent_at: dict[int, float] = {}
    period = 1 / 60
    i = 0
    term_at: float | None = None
    exited_at: float | None = None
    start = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if term_at is None and now - start >= 1.5:
                served.proc.send_signal(signal.SIGTERM)
                term_at = time.monotonic()
            if exited_at is None and served.proc.poll() is not None:
                exited_at = time.monotonic()
            if exited_at is not None and time.monotonic() - exited_at > 0.3:
                break
            if term_at is not None and now - term_at > 8:
                break
            if exited_at is None and now >= start + i * period:
                sock.send_multipart(_req(i, frames[i % 4]), flags=zmq.NOBLOCK)
                sent_at[i] = time.monotonic()
                i += 1
            while sock.poll(1):
                msg = sock.recv_multipart()
                hdr = json.loads(msg[0])
                assert hdr["id"] not in replies
                replies[hdr["id"]] = hdr
    finally:
        sock.close(linger=0)
        ctx.term()
    assert term_at is not None and exited_at is not None, served.log()
    assert served.proc.returncode == 0, served.log()
    assert exited_at - term_at <= 5.0
    before = [k for k, t in sent_at.items() if t < term_at - 0.05]
    assert len(before) >= 60
    missing = [k for k in before if k not in replies]
    assert not missing, f"{len(missing)} frames sent before SIGTERM got no reply"
    assert all(replies[k]["status"] in ("ok", "dropped") for k in before)
    statuses = {h["status"] for h in replies.values()}
    assert statuses <= {"ok", "dropped", "error"}
    assert all(h["error"]["code"] == "overloaded" for h in replies.values() if h["status"] == "error")
    log = served.log()
    m = re.search(r"medge stopped in [\d.]+ s: (\d+) frames accepted, (\d+) answered", log)
    assert m and m.group(1) == m.group(2), log
    accepted = int(m.group(1))
    assert accepted == sum(1 for h in replies.values() if h["status"] in ("ok", "dropped"))


@pytest.mark.peer("promtool")
def test_promtool_on_a_live_daemon(served: Served) -> None:
    served.wait_ready()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(served.ingest)
    img = np.zeros((64, 64), np.uint8)
    for i in range(5):
        sock.send_multipart(_req(i, img))
        sock.recv_multipart()
    sock.send_multipart([b"garbage"])
    sock.recv_multipart()
    sock.close(linger=0)
    ctx.term()
    with urllib.request.urlopen(served.http + "/metrics", timeout=5) as resp:
        body = resp.read()
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert res.returncode == 0, (res.stdout + res.stderr).decode()
    text = body.decode()
    assert 'medge_requests_failed_total{code="bad_header",source="zmq"} 1.0' in text
    assert 'medge_frames_received_total{model="tiny-seg",source="zmq"} 5.0' in text
    assert _status(served.http + "/healthz") == 200
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(5) == 0


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not HAVE_BUNDLED, reason="the bundled engines are not built yet (trainer)")
def test_no_config_serves_the_bundled_models(tmp_path: Path) -> None:
    s = Served(tmp_path, {"MEDGE_ENGINES_DIR": str(default_engines_dir())})
    try:
        ready_s = s.wait_ready()
        assert ready_s <= 5.0, f"ready after {ready_s:.2f} s"
        rss = _rss_bytes(s.proc.pid)
        assert rss <= 400 * 2**20, f"RSS {rss / 2**20:.0f} MiB"
        with urllib.request.urlopen(s.http + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for name in BUNDLED:
            assert re.search(rf'medge_model_info\{{[^}}]*model="{name}"[^}}]*\}} 1\.0', text), name
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(s.ingest)
        sock.send_multipart(_req(1, np.zeros((480, 640), np.uint8)))
        hdr = json.loads(sock.recv_multipart()[0])
        assert hdr["status"] == "ok" and hdr["model"] == "us-lesion-seg"
        sock.close(linger=0)
        ctx.term()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(5) == 0
    finally:
        s.stop()


def test_engines_verify_and_doctor_cli(engines_copy: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MEDGE_ENGINES_DIR": str(engines_copy), "MEDGE_SPOOL_DIR": str(tmp_path / "spool")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge.cli", *a], env=env, capture_output=True, text=True, timeout=60)  # noqa: E731
    res = run("engines", "verify")
    assert res.returncode == 0 and "all artifacts verified" in res.stdout
    listed = json.loads(run("engines", "list", "--json").stdout)
    assert [m["name"] for m in listed["models"]] == ["tiny-det", "tiny-seg"]
    doctor = run("doctor", "--json")
    report = json.loads(doctor.stdout)
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["config"] == "ok" and checks["engine tiny-seg"] == "ok" and checks["spool"] == "ok"
    with open(engines_copy / "tiny-seg" / "model.onnx", "ab") as fh:
        fh.write(b"x")
    res = run("engines", "verify")
    assert res.returncode == 1 and "sha256 mismatch" in res.stdout
    doctor = run("doctor")
    assert doctor.returncode == 1 and "[FAIL] engine tiny-seg" in doctor.stdout


def test_serve_check(tmp_path: Path, fixture_engines: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge.cli import main

    cfg = tmp_path / "medge.toml"
    cfg.write_text(f'engines_dir = "{fixture_engines}"\n[[models]]\nname = "tiny-seg"\nprecision = "auto"\n')
    assert main(["serve", "--config", str(cfg), "--check"]) == 0
    out = capsys.readouterr().out
    assert "tiny-seg v1: segmentation, onnxruntime, int8" in out and "configuration OK" in out


def test_serve_check_and_doctor_load_the_metrics_files_as_serve_does(
    tmp_path: Path, fixture_engines: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated htpasswd hash or a key file that is not a key: serve refused it, --check and doctor passed it."""
    from edge.cli import main
    from edge.commands.doctor import run_checks

    bad = tmp_path / "h.htpasswd"
    bad.write_text("prom:$2b$12$short\n")
    cfg = tmp_path / "medge.toml"
    cfg.write_text(
        f'engines_dir = "{fixture_engines}"\n[[models]]\nname = "tiny-seg"\n'
        f'[metrics]\nbasic_auth_file = "{bad}"\n'
    )
    assert main(["serve", "--config", str(cfg), "--check"]) != 0
    assert "line 1" in capsys.readouterr().err
    checks = {c.name: c for c in run_checks(cfg)}
    assert checks["metrics files"].status == "fail" and "line 1" in checks["metrics files"].detail
    key = tmp_path / "not-a.key"
    key.write_text("not a key\n")
    cfg.write_text(
        f'engines_dir = "{fixture_engines}"\n[[models]]\nname = "tiny-seg"\n'
        f'[metrics]\ntls_cert = "{key}"\ntls_key = "{key}"\n'
    )
    assert main(["serve", "--config", str(cfg), "--check"]) != 0
    assert "metrics.tls" in capsys.readouterr().err
    assert {c.name: c for c in run_checks(cfg)}["metrics files"].status == "fail"


def test_sigterm_during_start_up_never_sends_ready(
    tmp_path: Path, fixture_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM while models load: the daemon shuts down once started, without READY=1 (it sent READY=1 first)."""
    import signal as _signal

    from edge.commands import serve
    from edge.daemon import Daemon

    sent: list[str] = []
    monkeypatch.setattr(serve, "sd_notify", lambda msg: sent.append(msg) or True)
    monkeypatch.setattr(serve, "exit_after", lambda _s: None)  # no watchdog timer for the test process

    class SigtermDuringStart(Daemon):
        def start(self) -> "Daemon":  # the signal arrives while the daemon is still starting
            started = super().start()
            os.kill(os.getpid(), _signal.SIGTERM)
            return started

    monkeypatch.setattr(serve, "Daemon", SigtermDuringStart)
    cfg = tmp_path / "medge.toml"
    cfg.write_text(
        f'engines_dir = "{fixture_engines}"\nspool_dir = "{tmp_path / "spool"}"\n[[models]]\nname = "tiny-seg"\n'
        '[zmq]\ningest = "tcp://127.0.0.1:*"\npublish = "tcp://127.0.0.1:*"\n[metrics]\nenabled = false\n'
        "[dicom]\nenabled = false\n"
    )
    previous = _signal.getsignal(_signal.SIGTERM)
    try:
        assert serve.run(argparse.Namespace(config=str(cfg), check=False)) == 0
    finally:
        _signal.signal(_signal.SIGTERM, previous)
    assert "READY=1" not in sent and "STOPPING=1" in sent, sent


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge.daemon import sd_notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert srv.recv(100) == b"READY=1"
