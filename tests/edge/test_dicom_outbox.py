"""The durable outbox against real peers: DCMTK storescp and a scripted pynetdicom SCP."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SegmentationStorage

from edge.egress.dicom.common import ModelInfo, SourceResult
from edge.egress.dicom.outbox import Destination, Outbox, RetryPolicy
from edge.egress.dicom.results import build_results
from tests.conftest import peer_path
from tests.conftest import wait_until as poll  # the one deadline poll of the suite
from tests.edge import dicom_factory as f

STORESCP = peer_path("storescp") or "storescp"
FAST = RetryPolicy(retry_base_s=0.05, retry_max_s=0.3, max_attempts=50, attempt_window_s=3600)
DET = ModelInfo("xray-nodule-det", "1", "detection", ("nodule",))


def results(n: int) -> list:
    """``n`` distinct SR result objects."""
    out = []
    for i in range(n):
        src = f.make_dx(np.full((32, 32), i, np.uint16))
        boxes = [[{"label": "nodule", "score": 0.5 + i / 100, "x0": 1, "y0": 2, "x1": 10, "y1": 12}]]
        out.extend(build_results([SourceResult(src, [1], None, boxes)], DET))
    return out


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class ScriptedSCP:
    """A pynetdicom storage SCP answering a scripted status per C-STORE, then success.

    ``ssl_context``: speak TLS; ``peer_subjects`` then holds the commonName of
    the client certificate of each stored object (``""`` when there was none).
    """

    def __init__(self, statuses: list[int], port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.script = list(statuses)
        self.stored: list[str] = []
        self.peer_subjects: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="SCRIPTED")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SegmentationStorage)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)], ssl_context=ssl_context
        )
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:  # noqa: ANN001
        sock = event.assoc.dul.socket.socket
        cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        cn = dict(item for rdn in cert["subject"] for item in rdn).get("commonName", "") if cert else ""
        with self.lock:
            status = self.script.pop(0) if self.script else 0x0000
            if status == 0x0000:
                self.stored.append(str(event.request.AffectedSOPInstanceUID))
                self.peer_subjects.append(cn)
            return status

    def close(self) -> None:
        self.server.shutdown()


@contextlib.contextmanager
def scripted_outbox(tmp_path: Path, scp: "ScriptedSCP", reg: CollectorRegistry, policy: RetryPolicy) -> Iterator[Outbox]:
    """An outbox whose one destination, ``pacs``, is ``scp``; ``scp`` is closed on the way out, whatever happens."""
    try:
        with Outbox(tmp_path / "outbox", [Destination("pacs", "127.0.0.1", scp.port, "SCRIPTED")], reg, policy=policy) as ob:
            yield ob
    finally:
        scp.close()


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


@pytest.mark.peer("storescp")
def test_destination_down_then_up_gets_everything_exactly_once(tmp_path: Path) -> None:
    port = f.free_port()
    reg = CollectorRegistry()
    objs = results(3)
    with Outbox(tmp_path / "outbox", [Destination("pacs", "127.0.0.1", port, "PACS")], reg, policy=FAST) as ob:
        for o in objs:
            ob.put(o)
        # Nobody listens: several attempts, all backed off.
        poll(lambda: metric(reg, "medge_outbox_failures_total", destination="pacs") >= 2, what="failed attempts")
        assert metric(reg, "medge_outbox_pending", destination="pacs") == 3
        pacs_dir = tmp_path / "pacs"
        pacs_dir.mkdir()
        pacs = subprocess.Popen([STORESCP, "-od", str(pacs_dir), "-aet", "PACS", "-uf", str(port)])
        try:
            wait_port(port)
            assert ob.wait_idle(20)
        finally:
            pacs.terminate()
            pacs.wait(10)
    got = sorted(str(dcmread(p).SOPInstanceUID) for p in pacs_dir.iterdir())
    assert got == sorted(str(o.SOPInstanceUID) for o in objs)  # each exactly once
    assert metric(reg, "medge_outbox_sent_total", destination="pacs") == 3
    assert metric(reg, "medge_outbox_pending", destination="pacs") == 0


def test_transient_refusals_are_retried_and_delivered_once_per_destination(tmp_path: Path) -> None:
    flaky = ScriptedSCP([0xA700, 0xA700, 0xA701, 0xA700])  # out of resources, four times
    steady = ScriptedSCP([])
    reg = CollectorRegistry()
    objs = results(3)
    dests = [Destination("flaky", "127.0.0.1", flaky.port, "SCRIPTED"), Destination("steady", "127.0.0.1", steady.port, "SCRIPTED")]
    try:
        with Outbox(tmp_path / "outbox", dests, reg, policy=FAST) as ob:
            for o in objs:
                ob.put(o)
            assert ob.wait_idle(20)
    finally:
        flaky.close()
        steady.close()
    want = sorted(str(o.SOPInstanceUID) for o in objs)
    assert sorted(flaky.stored) == want and sorted(steady.stored) == want
    assert metric(reg, "medge_outbox_failures_total", destination="flaky") == 4
    assert metric(reg, "medge_outbox_failures_total", destination="steady") == 0
    assert list((tmp_path / "outbox" / "pending" / "flaky").iterdir()) == []  # no attempts files left


def test_permanent_refusal_goes_to_dead_letter_with_reason(tmp_path: Path) -> None:
    scp = ScriptedSCP([0xA900])
    reg = CollectorRegistry()
    objs = results(2)
    with scripted_outbox(tmp_path, scp, reg, FAST) as ob:
        for o in objs:
            ob.put(o)
        assert ob.wait_idle(20)
        dead = ob.dead_letters("pacs")
        # Disk use follows the files: the sent one is gone, the dead letter still counts.
        assert ob.stored_bytes() == ob.stored_bytes(recount=True) == dead[0].stat().st_size > 0
        dead[0].unlink()  # a person clears the dead letter: seen on the next recount
        assert ob.stored_bytes(recount=True) == 0
    assert len(dead) == 1 and len(scp.stored) == 1
    reason = dead[0].with_name(dead[0].stem + ".reason.txt").read_text()
    assert "0xA900" in reason
    assert metric(reg, "medge_outbox_dead_letter_total", destination="pacs") == 1


def test_too_many_transient_refusals_in_the_window_go_to_dead_letter(tmp_path: Path) -> None:
    scp = ScriptedSCP([0x0110] * 3)  # processing failure: transient, but charged (out of resources is not)
    reg = CollectorRegistry()
    policy = RetryPolicy(retry_base_s=0.05, retry_max_s=0.1, max_attempts=3, attempt_window_s=60)
    with scripted_outbox(tmp_path, scp, reg, policy) as ob:
        ob.put(results(1)[0])
        assert ob.wait_idle(20)
        (dead,) = ob.dead_letters("pacs")
    assert "refused 3 times" in dead.with_name(dead.stem + ".reason.txt").read_text()
    assert scp.stored == []


def test_out_of_resources_is_waited_out_and_never_dead_lettered(tmp_path: Path) -> None:
    """Defect 5: a PACS out of resources (0xA7xx, 0x0213) far more often than max_attempts loses nothing."""
    scp = ScriptedSCP([0xA700, 0xA701, 0x0213, 0xA7FF, 0xA700, 0xA700, 0xA700])
    reg = CollectorRegistry()
    policy = RetryPolicy(retry_base_s=0.01, retry_max_s=0.02, max_attempts=2, attempt_window_s=3600)
    objs = results(2)
    with scripted_outbox(tmp_path, scp, reg, policy) as ob:
        for o in objs:
            ob.put(o)
        assert ob.wait_idle(20)
        assert ob.dead_letters("pacs") == []
    assert sorted(scp.stored) == sorted(str(o.SOPInstanceUID) for o in objs)
    assert metric(reg, "medge_outbox_failures_total", destination="pacs") == 7
    assert metric(reg, "medge_outbox_dead_letter_total", destination="pacs") == 0
    assert not list((tmp_path / "outbox" / "pending" / "pacs").glob("*.attempts.json"))  # nothing charged


def test_a_refused_object_waits_its_backoff_while_the_others_go(tmp_path: Path) -> None:
    """Defect 5: no head-of-line blocking: the first object's refusal does not hold back the rest."""
    scp = ScriptedSCP([0xA700])  # the oldest object is refused once, the others are accepted
    reg = CollectorRegistry()
    policy = RetryPolicy(retry_base_s=30.0, retry_max_s=30.0, max_attempts=10, attempt_window_s=3600)
    objs = results(3)
    with scripted_outbox(tmp_path, scp, reg, policy) as ob:
        for o in objs:
            ob.put(o)
        poll(lambda: len(ob.pending("pacs")) == 1, what="the two objects behind the refused one sent")
        assert len(scp.stored) == 2  # the refused one waits its 30 s backoff
        assert ob.pending("pacs")[0].stem not in scp.stored  # the refused one, not sent


def test_pending_results_survive_a_restart(tmp_path: Path) -> None:
    port = f.free_port()
    objs = results(2)
    dest = [Destination("pacs", "127.0.0.1", port, "SCRIPTED")]
    with Outbox(tmp_path / "outbox", dest, CollectorRegistry(), policy=FAST) as ob:
        for o in objs:
            ob.put(o)
        written = ob.stored_bytes()
    files = list((tmp_path / "outbox" / "pending" / "pacs").glob("*.dcm"))
    assert len(files) == 2 and written == sum(p.stat().st_size for p in files)
    scp = ScriptedSCP([])
    try:
        dest = [Destination("pacs", "127.0.0.1", scp.port, "SCRIPTED")]
        reg = CollectorRegistry()
        with Outbox(tmp_path / "outbox", dest, reg, policy=FAST) as ob:
            assert metric(reg, "medge_outbox_pending", destination="pacs") == 2
            assert ob.stored_bytes() == written  # counted from disk at start
            assert ob.wait_idle(20)
            assert ob.stored_bytes() == 0
    finally:
        scp.close()
    assert sorted(scp.stored) == sorted(str(o.SOPInstanceUID) for o in objs)


def test_pending_listing_tolerates_a_file_sent_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender removes a delivered file between put()'s listing and its stat: put() must still
    succeed (it once failed the whole series' results with FileNotFoundError)."""
    port = f.free_port()  # nobody listens: nothing is sent during the test
    a, b = results(2)
    with Outbox(tmp_path / "outbox", [Destination("pacs", "127.0.0.1", port, "PACS")], CollectorRegistry(), policy=FAST) as ob:
        (first,) = ob.put(a)
        real_stat = Path.stat

        def stat(self: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self == first:
                raise FileNotFoundError(2, "sent meanwhile", str(self))
            return real_stat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", stat)
        written = ob.put(b)
        assert [p.name for p in ob.pending("pacs")] == [p.name for p in written]


def test_an_unexpected_sender_error_backs_off_and_delivers_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender loop's error boundary: counted, backed off, retried; nothing dead-lettered."""
    scp = ScriptedSCP([])
    reg = CollectorRegistry()
    real = Outbox._send_batch
    calls = {"n": 0}

    def flaky(self: Outbox, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the sender")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Outbox, "_send_batch", flaky)
    objs = results(2)
    with scripted_outbox(tmp_path, scp, reg, FAST) as ob:
        for o in objs:
            ob.put(o)
        assert ob.wait_idle(20)
        assert ob.dead_letters("pacs") == []
    assert sorted(scp.stored) == sorted(str(o.SOPInstanceUID) for o in objs)
    assert metric(reg, "medge_internal_errors_total", component="outbox") == 1
    assert metric(reg, "medge_outbox_failures_total", destination="pacs") == 1


def test_a_failing_destination_is_logged_once_per_reason_then_on_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.egress.dicom.outbox")
    port = f.free_port()
    reg = CollectorRegistry()
    with Outbox(tmp_path / "outbox", [Destination("pacs", "127.0.0.1", port, "SCRIPTED")], reg, policy=FAST) as ob:
        ob.put(results(1)[0])
        poll(lambda: metric(reg, "medge_outbox_failures_total", destination="pacs") >= 4, what="failed attempts")
        warnings = [r for r in caplog.records if r.name == "edge.egress.dicom.outbox" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot connect" in warnings[0].getMessage()
        scp = ScriptedSCP([], port=port)
        try:
            assert ob.wait_idle(20)
        finally:
            scp.close()
    assert any("accepts results again" in r.getMessage() for r in caplog.records)


@pytest.mark.peer("storescp")
def test_outbox_associations_turn_nagle_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom leaves Nagle on; each small C-STORE then waits ~40 ms for a delayed ACK.
    import socket

    import edge.egress.dicom.outbox as outbox_module

    seen: list[int] = []
    real = outbox_module._no_delay

    def spy(event):  # the real hook, then what the kernel says about the association's socket
        ok = real(event)
        seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return ok

    monkeypatch.setattr(outbox_module, "_no_delay", spy)
    port = f.free_port()
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen([STORESCP, "-od", str(pacs_dir), "-aet", "PACS", str(port)])
    try:
        wait_port(port)
        with Outbox(tmp_path / "outbox", [Destination("pacs", "127.0.0.1", port, "PACS")], CollectorRegistry(),
                    policy=FAST) as ob:
            for o in results(2):
                ob.put(o)
            assert ob.wait_idle(20)
    finally:
        pacs.terminate()
        pacs.wait(10)
    assert seen and all(v != 0 for v in seen)
    assert len(list(pacs_dir.iterdir())) == 2
