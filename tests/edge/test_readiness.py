"""/readyz and ``medge_ready`` tell the truth, and the systemd watchdog follows them.

Before, readiness was set once at start-up and never cleared: a dead model
worker or a dead ZeroMQ I/O loop left ``/readyz`` at 200 while every request
went unanswered. Here a worker thread is really killed (a BaseException,
which no error boundary may swallow, escapes the model) or really hung, in
process and in a real ``medge serve`` child process, and the HTTP probe
must turn 503 with the component in its body, ``medge_ready`` must turn 0
and the ``WATCHDOG=1`` pings to systemd must stop.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import zmq

from edge.config import load_config
from edge.daemon import Daemon, FAULT_INJECT_ENV, Watchdog, inject_fault
from edge.egress.dicom.outbox import Outbox
from edge.tools.daemon_process import DaemonProcess, free_port, write_demo_config
from tests.edge.dicom_factory import make_us_single


class _KillWorker(BaseException):
    """Escapes every ``except Exception`` boundary: the worker thread dies."""


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _status(url: str) -> int:
    return _get(url)[0]


def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``cond`` until true or the deadline passes (a deadline, not a sleep-based sync)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _env(fixture_engines: Path, **extra: str) -> dict[str, str]:
    return {
        "MEDGE_ENGINES_DIR": str(fixture_engines),
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__DEFAULT_MODEL": "tiny-seg",
        "MEDGE_METRICS__PORT": "0",
        "MEDGE_DICOM__ENABLED": "false",
        **extra,
    }


def _send_frame(endpoint: str) -> None:
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(endpoint)
        hdr = {"v": 1, "id": 1, "model": "tiny-seg", "dtype": "uint8", "shape": [8, 8]}
        s.send_multipart([json.dumps(hdr).encode(), np.zeros((8, 8), np.uint8).tobytes()])
        s.close()
    finally:
        ctx.term()


@pytest.fixture
def daemon(fixture_engines: Path) -> Iterator[Daemon]:
    with Daemon(load_config(None, env=_env(fixture_engines))) as d:
        yield d


def test_dead_worker_makes_readyz_503(daemon: Daemon) -> None:
    assert daemon.health is not None
    url = f"{daemon.health.url}/readyz"
    assert _get(url) == (200, "ready\n")
    assert daemon.registry.get_sample_value("medge_ready") == 1.0
    model = next(m for m in daemon.models if m.name == "tiny-seg")
    died = threading.Event()
    real_run = model.run

    def _explode(images):  # type: ignore[no-untyped-def]
        model.run = real_run  # type: ignore[method-assign]
        died.set()
        raise _KillWorker()

    model.run = _explode  # type: ignore[method-assign]
    old_hook = threading.excepthook
    threading.excepthook = lambda args: None  # the dying thread's traceback is expected here
    try:
        _send_frame(daemon.zmq.ingest_endpoint)
        assert died.wait(10)
        assert _until(lambda: daemon.scheduler is not None and not daemon.scheduler.healthy())
    finally:
        threading.excepthook = old_hook
    assert daemon.unhealthy() == ["scheduler"]
    code, body = _get(url)
    assert code == 503
    assert body.startswith("not ready: scheduler: ") and "model worker" in body
    assert daemon.registry.get_sample_value("medge_ready") == 0.0
    assert _status(f"{daemon.health.url}/healthz") == 200  # alive, not ready: the supervisor decides


def test_wedged_worker_makes_readyz_503_and_recovers(fixture_engines: Path) -> None:
    """A batch that never returns (work waits, nothing answered) is wedged after stall_s; answered, ready again."""
    with Daemon(load_config(None, env=_env(fixture_engines)), stall_s=0.3) as d:
        assert d.health is not None
        url = f"{d.health.url}/readyz"
        assert _status(url) == 200
        release = inject_fault(d, "worker-hang:tiny-seg")
        try:
            assert _status(url) == 200  # idle with nothing to do: healthy, however long
            _send_frame(d.zmq.ingest_endpoint)
            assert _until(lambda: d.scheduler is not None and d.scheduler.pending() == 1)
            assert _until(lambda: _status(url) == 503), "a wedged worker must make /readyz 503"
            code, body = _get(url)
            assert code == 503 and "scheduler: no frame answered for" in body and "while 1 wait" in body
            assert d.registry.get_sample_value("medge_ready") == 0.0
            assert d.scheduler.healthy()  # the thread is alive: only progress tells
        finally:
            release.set()
        assert _until(lambda: _status(url) == 200), "answered again: ready again"
        assert d.registry.get_sample_value("medge_ready") == 1.0


def test_one_wedged_model_while_another_serves(fixture_engines: Path) -> None:
    """tiny-seg hangs with a frame queued while tiny-det keeps answering: 503 names the model."""
    with Daemon(load_config(None, env=_env(fixture_engines)), stall_s=0.3) as d:
        assert d.health is not None and d.zmq is not None and d.scheduler is not None
        url = f"{d.health.url}/readyz"
        release = inject_fault(d, "worker-hang:tiny-seg")
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.zmq.ingest_endpoint)
            frame = np.zeros((8, 8), np.uint8).tobytes()

            def send(model: str, i: int) -> None:
                hdr = {"v": 1, "id": i, "model": model, "dtype": "uint8", "shape": [8, 8]}
                s.send_multipart([json.dumps(hdr).encode(), frame])

            send("tiny-seg", 0)  # taken by the worker, which hangs
            assert _until(lambda: d.scheduler.pending() == 1
                          and d.registry.get_sample_value("medge_queue_depth", {"model": "tiny-seg"}) == 0)
            send("tiny-seg", 1)  # waits in the queue behind it
            i = 2

            def det_answers_and_not_ready() -> bool:
                nonlocal i
                send("tiny-det", i)
                i += 1
                assert s.poll(5000), "tiny-det must keep answering"
                reply = json.loads(s.recv_multipart()[0])
                assert reply["model"] == "tiny-det" and reply["status"] == "ok"
                return _status(url) == 503

            assert _until(det_answers_and_not_ready)
            code, body = _get(url)
            assert code == 503 and "scheduler: model tiny-seg: no batch finished for" in body
        finally:
            release.set()
            ctx.destroy(linger=0)


def test_fault_spec_is_checked(daemon: Daemon) -> None:
    from edge.errors import ConfigError

    with pytest.raises(ConfigError, match="worker-exit:MODEL"):
        inject_fault(daemon, "explode")
    with pytest.raises(ConfigError, match="'nope' is not served"):
        inject_fault(daemon, "worker-exit:nope")


def test_readyz_names_each_dicom_component(fixture_engines: Path, tmp_path: Path) -> None:
    """The DICOM SCP, the pipeline and the outbox each answer for themselves in /readyz."""
    env = _env(
        fixture_engines,
        MEDGE_DICOM__ENABLED="true",
        MEDGE_DICOM__PORT="0",
        MEDGE_SPOOL_DIR=str(tmp_path / "spool"),
    )
    with Daemon(load_config(None, env=env)) as d:
        assert d.health is not None and d.dicom is not None
        url = f"{d.health.url}/readyz"
        assert _status(url) == 200 and d.problems() == []
        assert d.dicom.healthy() and d.dicom.pipeline.healthy() and d.dicom.outbox.healthy()
        d.dicom.pipeline.close()  # its worker and finaliser threads stop, as if they had died
        assert d.unhealthy() == ["dicom_pipeline"]
        code, body = _get(url)
        assert code == 503 and "dicom_pipeline: a DICOM pipeline thread" in body
        d.dicom.close()  # the SCP's accept loop and the outbox senders stop too
        assert set(d.unhealthy()) == {"dicom_scp", "dicom_pipeline", "outbox"}
        assert d.registry.get_sample_value("medge_ready") == 0.0


def test_outbox_backing_off_is_healthy_and_closed_is_not(tmp_path: Path) -> None:
    """An unreachable destination is the pending gauge's business, not readiness'."""
    from prometheus_client import CollectorRegistry

    from edge.config import DicomDestination, OutboxConfig

    dest = DicomDestination(name="pacs", host="127.0.0.1", port=free_port(), ae_title="PACS")
    reg = CollectorRegistry()
    box = Outbox(tmp_path / "outbox", [dest], reg, policy=OutboxConfig(), network_timeout_s=1.0)
    try:
        box.put(make_us_single(np.zeros((16, 16), np.uint8)))
        assert _until(lambda: (reg.get_sample_value("medge_outbox_failures_total", {"destination": "pacs"}) or 0) >= 1)
        assert box.healthy(stall_s=0.0)  # in backoff, not inside a send: healthy even with no slack
    finally:
        box.close()
    assert not box.healthy()
    assert Outbox(tmp_path / "none", [], CollectorRegistry()).healthy()  # no destinations: nothing to die


def test_watchdog_pings_only_while_healthy() -> None:
    healthy = threading.Event()
    healthy.set()
    saw_fault = threading.Event()
    pings: list[str] = []
    got = threading.Condition()

    def check() -> bool:
        ok = healthy.is_set()
        if not ok:
            saw_fault.set()
        return ok

    def notify(msg: str) -> bool:
        with got:
            pings.append(msg)
            got.notify_all()
        return True

    def wait_pings(n: int, timeout_s: float = 5.0) -> bool:
        with got:
            return got.wait_for(lambda: len(pings) >= n, timeout=timeout_s)

    wd = Watchdog(check, 0.01, notify=notify).start()
    try:
        assert wait_pings(3)
        healthy.clear()
        assert saw_fault.wait(5)
        # Check and ping are one step of one thread: once a check said no, every earlier ping is in.
        n = len(pings)
        assert not wait_pings(n + 1, timeout_s=0.3), "no ping while a loop is dead or wedged (30 intervals)"
        healthy.set()
        assert wait_pings(n + 2)  # pings again once every loop makes progress
    finally:
        wd.stop()
    assert set(pings) == {"WATCHDOG=1"}
    assert Watchdog.interval_from_env({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert Watchdog.interval_from_env({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not ours
    assert Watchdog.interval_from_env({}) is None


class _NotifySocket:
    """The datagram socket systemd would own: collects what the daemon sends, with receipt times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def mark(self) -> float:
        """Send a marker datagram; return when it arrived (everything sent before it has arrived too)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"MARK", str(self.path))
        assert self.wait_for("MARK", timeout_s=5)
        with self._cond:
            return max(t for t, m in self.messages if m == "MARK")

    def count(self, msg: str, after: float = 0.0) -> int:
        with self._cond:
            return sum(1 for t, m in self.messages if m == msg and t > after)

    def wait_for(self, msg: str, n: int = 1, after: float = 0.0, timeout_s: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: sum(1 for t, m in self.messages if m == msg and t > after) >= n,
                                       timeout=timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_fault_injection_in_a_real_daemon(fixture_engines: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """MEDGE_FAULT_INJECT kills a model worker in a real ``medge serve``: 503 + reason, medge_ready 0, no more pings."""
    ports = {k: free_port() for k in ("ingest", "publish", "metrics", "dicom")}
    cfg = write_demo_config(tmp_path / "medge.toml", engines_dir=fixture_engines, spool_dir=tmp_path / "spool",
                            models=["tiny-seg"], ports=ports, dicom=False, precision="fp32", routes={},
                            results_port=None)
    notify = _NotifySocket(tmp_path / "notify.sock")
    interval_s = 0.1
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(2 * interval_s * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv(FAULT_INJECT_ENV, "worker-exit:tiny-seg")
    base = f"http://127.0.0.1:{ports['metrics']}"
    proc = DaemonProcess(cfg, ports["metrics"], tmp_path / "daemon.log")
    try:
        proc.wait_ready(60.0)
        assert notify.wait_for("READY=1"), proc.log_tail()
        assert notify.wait_for("WATCHDOG=1", n=3), "the watchdog pings while every loop makes progress"
        assert _get(base + "/readyz") == (200, "ready\n")
        assert "\nmedge_ready 1.0\n" in _get(base + "/metrics")[1]

        _send_frame(f"tcp://127.0.0.1:{ports['ingest']}")  # the worker that takes it exits
        assert _until(lambda: _status(base + "/readyz") == 503, 20), proc.log_tail()
        code, body = _get(base + "/readyz")
        assert code == 503 and body.startswith("not ready: scheduler: ") and "model worker" in body
        assert "\nmedge_ready 0.0\n" in _get(base + "/metrics")[1]
        # The watchdog logs when its check first fails; every ping it sent before is then queued on
        # our socket ahead of a marker we send now (datagrams to one socket keep their order).
        assert _until(lambda: "no longer pinged" in proc.log_path.read_text(errors="replace"), 10), proc.log_tail()
        marker_at = notify.mark()
        assert not notify.wait_for("WATCHDOG=1", after=marker_at, timeout_s=20 * interval_s), \
            "no WATCHDOG=1 once a worker died (20 intervals)"
        assert proc.proc.poll() is None  # the process lives on: systemd's watchdog decides, not the daemon
    finally:
        code = proc.stop()
        log = proc.log_path.read_text(errors="replace")
        notify.close()
    assert code == 0, log[-3000:]
    assert notify.count("STOPPING=1") == 1
    assert "fault injection armed" in log


def test_startup_heap_is_frozen_while_serving_and_released_on_close(fixture_engines: Path) -> None:
    """A full garbage collection must not walk the start-up heap (models, modules) under a frame."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    d = Daemon(load_config(None, env=_env(fixture_engines))).start()
    try:
        assert d.ready
        assert gc.get_freeze_count() > 10_000  # the imported modules and loaded sessions at least
    finally:
        d.close()
    assert gc.get_freeze_count() == 0


def test_heap_stays_frozen_while_another_daemon_serves_and_after_a_failed_close(fixture_engines: Path) -> None:
    """The freeze is released by the last daemon to close, also when a step of close() raises."""
    import gc

    gc.unfreeze()
    a = Daemon(load_config(None, env=_env(fixture_engines))).start()
    b = Daemon(load_config(None, env=_env(fixture_engines))).start()
    try:
        a.close()
        assert gc.get_freeze_count() > 10_000  # b still serves: its heap stays out of the collector's way
        real_close = b.models.close

        def boom() -> None:
            real_close()
            raise RuntimeError("closing the models failed")

        b.models.close = boom  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            b.close()
        assert gc.get_freeze_count() == 0
    finally:
        a.close()
        b.close()
