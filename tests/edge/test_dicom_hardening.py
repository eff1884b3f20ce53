"""The DICOM side under hostile or unlucky input: deflate bombs, frame floods, idle connections, poison pills.

Each test sets up the situation as a peer (or a crash) would: a real
pynetdicom/DCMTK peer on loopback, idle sockets bound to other loopback
addresses (Linux routes all of 127/8 to loopback, so 127.0.0.2 is another
peer), and child processes that are killed with SIGKILL in the middle of
processing, as the OOM killer would.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from edge.config import DicomTlsConfig
from edge.egress.dicom.common import ModelInfo
from edge.errors import ProtocolError
from edge.ingest.dicom.pipeline import FRAMES_PER_TURN
from edge.ingest.dicom.scp import DicomIngest
from tests.conftest import peer_path, require_peer, wait_until
from tests.edge import dicom_factory as f

ECHOSCU = peer_path("echoscu") or "echoscu"
REPO = Path(__file__).resolve().parents[2]
INFOS = {
    "us-lesion-seg": ModelInfo("us-lesion-seg", "1", "segmentation", ("lesion",)),
    "xray-nodule-det": ModelInfo("xray-nodule-det", "1", "detection", ("nodule",)),
}
PATIENT = ("MEDGE^TEST", "MEDGE-TEST-1")  # the factory's made-up identifiers: must never show up anywhere

pytestmark = pytest.mark.peer("echoscu")


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., tuple[DicomIngest, f.FakeService, CollectorRegistry]]]:
    started: list[DicomIngest] = []

    def _start(service: f.FakeService | None = None, **dicom) -> tuple[DicomIngest, f.FakeService, CollectorRegistry]:
        dicom.setdefault("allowed_calling_aes", ("MODALITY", "PYSCU"))
        cfg = f.dicom_config(tmp_path / f"scp{len(started)}", **dicom)
        svc, reg = service or f.FakeService(), CollectorRegistry()
        ing = DicomIngest(cfg, svc, reg, cfg.spool_dir, model_info=INFOS.__getitem__)
        started.append(ing.start())
        return ing, svc, reg

    yield _start
    for ing in started:
        ing.close()


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def wait_metric(reg: CollectorRegistry, name: str, value: float, timeout_s: float = 5.0, **labels: str) -> float:
    """Poll ``name{labels}`` until it reaches ``value`` (counters are bumped by other threads); returns it."""
    deadline = time.monotonic() + timeout_s
    while metric(reg, name, **labels) < value and time.monotonic() < deadline:
        time.sleep(0.02)
    return metric(reg, name, **labels)


store = f.c_store  # send files as stored; returns the status data sets


def echo(port: int, tls: ssl.SSLContext | None = None, timeout_s: float = 2.0) -> tuple[bool, float]:
    """C-ECHO from 127.0.0.1 with pynetdicom (TLS if given): (succeeded, seconds it took)."""
    t0 = time.monotonic()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGE", tls_args=(tls, None) if tls else None)
    ok = assoc.is_established and int(assoc.send_c_echo().Status) == 0
    if assoc.is_established:
        assoc.release()
    return ok, time.monotonic() - t0


def echoscu(port: int, *tls: str) -> tuple[int, float]:
    """DCMTK echoscu from 127.0.0.1: (exit status, seconds it took)."""
    t0 = time.monotonic()
    r = subprocess.run(
        [ECHOSCU, *tls, "-to", "5", "-ta", "5", "-aet", "MODALITY", "-aec", "MEDGE", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=30,
    )
    return r.returncode, time.monotonic() - t0


def idle(port: int, n: int, source: str = "127.0.0.2", send: bytes = b"") -> list[socket.socket]:
    """``n`` TCP connections from ``source`` that send ``send`` (or nothing) and then sit idle."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        if send:
            s.sendall(send)
        out.append(s)
    return out


def closed_within(s: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the server closed ``s`` (EOF or reset), or None if still open after ``timeout_s``."""
    t0 = time.monotonic()
    s.settimeout(timeout_s)
    try:
        data = s.recv(1)
    except TimeoutError:
        return None
    except OSError:
        return time.monotonic() - t0
    return time.monotonic() - t0 if data == b"" else None


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _pdu_item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_raw(port: int, source: str, calling: bytes = b"PYSCU") -> socket.socket:
    """A Verification association from ``source``, by hand: the socket once the A-ASSOCIATE-AC is in."""
    context = _pdu_item(0x20, b"\x01\x00\x00\x00" + _pdu_item(0x30, b"1.2.840.10008.1.1") + _pdu_item(0x40, b"1.2.840.10008.1.2"))
    user = _pdu_item(0x50, _pdu_item(0x51, struct.pack(">I", 16384)) + _pdu_item(0x52, b"1.2.826.0.1.3680043.9.1"))
    body = (struct.pack(">HH", 1, 0) + b"MEDGE".ljust(16) + calling.ljust(16) + bytes(32)
            + _pdu_item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5.0)
    s.connect(("127.0.0.1", port))
    s.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
    kind, _, length = struct.unpack(">BBI", s.recv(6, socket.MSG_WAITALL))
    assert kind == 0x02, f"association not accepted (PDU type 0x{kind:02X})"
    s.recv(length, socket.MSG_WAITALL)
    return s


def read_until_closed(s: socket.socket, timeout_s: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes ``s`` and the seconds that took (None: still open)."""
    t0 = time.monotonic()
    got = b""
    while True:
        left = timeout_s - (time.monotonic() - t0)
        if left <= 0:
            return got, None
        s.settimeout(left)
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            return got, None
        except OSError:
            return got, time.monotonic() - t0
        if not chunk:
            return got, time.monotonic() - t0
        got += chunk


def vm_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory figure (``VmRSS``, ``VmSize``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc status")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = require_peer("openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size of a process (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# --------------------------------------------------------------------------- a real SCP process
CHILD_SCP = r"""
import pathlib, sys
from prometheus_client import CollectorRegistry
from edge.ingest.dicom.scp import DicomIngest
from tests.edge import dicom_factory as f

cfg = f.dicom_config(pathlib.Path(sys.argv[1]), allowed_calling_aes=("MODALITY", "PYSCU"), connect_timeout_s=2.0)
ing = DicomIngest(cfg, None, CollectorRegistry(), cfg.spool_dir).start()  # receive and spool only
print(ing.port, flush=True)
sys.stdin.read()  # until the test closes our stdin
ing.close()
"""


@pytest.fixture(scope="module")
def scp_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    d = tmp_path_factory.mktemp("scp_process")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCP, str(d)], cwd=REPO, env=child_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(proc.stdout.readline())
        yield proc, port, d / "spool" / "dicom"
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- issue 2: deflate bombs
def test_deflate_bomb_is_refused_before_it_is_inflated_and_the_receiver_stays_small(
    scp_process, tmp_path: Path
) -> None:
    proc, port, spool = scp_process
    bomb = f.write_deflate_bomb(tmp_path / "bomb.dcm", 2048 << 20)  # 2 GiB of zeros
    assert bomb.stat().st_size < 2_500_000
    ok = tmp_path / "ok.dcm"
    us = f.make_us_single(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    f.write_part10(ok, f.US, str(us.SOPInstanceUID), DeflatedExplicitVRLittleEndian,
                   [f.encode_dataset(us, DeflatedExplicitVRLittleEndian)])
    before = vm_hwm_bytes(proc.pid)
    t0 = time.monotonic()
    bomb_rsp, ok_rsp = store(port, [bomb, ok])
    took = time.monotonic() - t0
    grew = vm_hwm_bytes(proc.pid) - before
    print(f"deflate bomb: answered in {took:.2f} s; receiver peak RSS grew by {grew / 2**20:.1f} MiB")
    assert int(bomb_rsp.Status) == 0xA700
    assert "max_inflated_mb" in bomb_rsp.ErrorComment and len(bomb_rsp.ErrorComment) <= 64
    assert grew < 64 << 20  # bounded before allocated: not the 2 GiB the stream inflates to
    # A deflated instance of honest size is still accepted and spooled as sent; the bomb left nothing.
    assert int(ok_rsp.Status) == 0
    assert sorted(p.name for p in spool.joinpath("instances").glob("*.dcm")) == [f"{us.SOPInstanceUID}.dcm"]
    assert list(spool.joinpath("tmp").iterdir()) == []


def test_a_bomb_already_in_the_spool_is_quarantined_at_recovery_without_inflating_it(
    tmp_path: Path, start_scp
) -> None:
    """An instance accepted before the bound existed (or by an older version) must not crash-loop the daemon."""
    bomb = f.write_deflate_bomb(tmp_path / "bomb.dcm", 1024 << 20)
    cfg = f.dicom_config(tmp_path)
    from edge.ingest.dicom.spool import Spool

    uid = str(read_file_meta_info(bomb).MediaStorageSOPInstanceUID)
    Spool(cfg.spool_dir / "dicom").store_instance(uid, [bomb.read_bytes()])
    svc, reg = f.FakeService(), CollectorRegistry()
    tracemalloc.start()
    try:
        with DicomIngest(cfg, svc, reg, cfg.spool_dir, model_info=INFOS.__getitem__).start() as ing:
            _current, peak = tracemalloc.get_traced_memory()
            assert ing.pipeline.idle()
    finally:
        tracemalloc.stop()
    print(f"recovery of a spooled 1 GiB deflate bomb: peak traced allocation {peak / 2**20:.1f} MiB")
    assert peak < 64 << 20
    assert svc.calls == []
    failed = cfg.spool_dir / "dicom" / "failed"
    assert [p.name for p in failed.glob("*.dcm")] == [f"{uid}.dcm"]
    reason = (failed / f"{uid}.reason.txt").read_text()
    assert reason.startswith("limits:") and "max_inflated_mb" in reason
    assert not any(p in reason for p in PATIENT)
    assert metric(reg, "medge_dicom_processing_failures_total", reason="limits") == 1


# --------------------------------------------------------------------------- codestream bombs, undecodable images
BOMB_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80")  # JPEG, J2K, JPEG-LS


def test_codestream_bombs_are_refused_at_the_scp_and_an_honest_frame_still_runs(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp()
    bombs = [f.save(f.make_codestream_bomb(ts, declared=60000), tmp_path / f"bomb{i}.dcm")
             for i, ts in enumerate(BOMB_SYNTAXES)]
    assert all(p.stat().st_size < 4096 for p in bombs)  # 64 x 64 data sets; the codestreams say 60000 x 60000
    honest = f.save(f.make_compressed_us("1.2.840.10008.1.2.4.50"), tmp_path / "honest.dcm")
    rsp = store(ing.port, bombs + [honest])
    assert [int(r.Status) for r in rsp] == [0xC210, 0xC210, 0xC210, 0]
    assert {r.ErrorComment for r in rsp[:3]} == {"Frame codestream is larger than the data set's image"}
    assert ing.pipeline.wait_idle(20)
    assert [c[1] for c in svc.calls] == [(64, 64)]  # only the honest one reached a decoder and the model
    assert list(ing.spool.failed_dir.glob("*.dcm")) == []
    assert metric(reg, "medge_dicom_store_failures_total", status="0xC210") == 3


def test_a_codestream_bomb_already_in_the_spool_is_quarantined_as_limits_without_decoding(tmp_path: Path) -> None:
    from edge.ingest.dicom.spool import Spool

    cfg = f.dicom_config(tmp_path)
    bomb = f.make_codestream_bomb("1.2.840.10008.1.2.4.90", declared=60000)
    path = Spool(cfg.spool_dir / "dicom").store_instance(
        str(bomb.SOPInstanceUID), [f.save(bomb, tmp_path / "bomb.dcm").read_bytes()]
    )
    svc, reg = f.FakeService(), CollectorRegistry()
    tracemalloc.start()
    try:
        with DicomIngest(cfg, svc, reg, cfg.spool_dir, model_info=INFOS.__getitem__).start() as ing:
            assert ing.pipeline.idle()
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"recovery of a spooled 60000 x 60000 JPEG 2000 bomb: peak traced allocation {peak / 2**20:.1f} MiB")
    assert peak < 64 << 20 and svc.calls == []
    failed = cfg.spool_dir / "dicom" / "failed"
    assert [p.name for p in failed.glob("*.dcm")] == [path.name]
    reason = (failed / f"{path.stem}.reason.txt").read_text()
    assert reason.startswith("limits:") and "JPEG 2000 header declares 60000 x 60000" in reason
    assert not any(p in reason for p in PATIENT)
    assert metric(reg, "medge_dicom_processing_failures_total", reason="limits") == 1


def test_images_medge_could_never_decode_and_deep_nesting_are_refused_at_the_scp(start_scp, tmp_path: Path) -> None:
    ing, svc, _reg = start_scp()
    bad = []
    for i, (attribute, value) in enumerate(
        [("Rows", 0), ("Columns", 0), ("BitsAllocated", 0), ("BitsAllocated", 64), ("SamplesPerPixel", 0), ("SamplesPerPixel", 7)]
    ):
        ds = f.make_us_single(np.zeros((16, 16), np.uint8))
        setattr(ds, attribute, value)
        bad.append(f.save(ds, tmp_path / f"bad{i}.dcm"))
    # 10,000 sequences of defined length, nested.
    nested = b""
    for _ in range(10_000):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(nested)) + nested
        nested = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    uid = "1.2.826.0.1.3680043.9.7.1"
    head = f.encode_dataset(f.make_us_single(np.zeros((4, 4), np.uint8)), "1.2.840.10008.1.2.1")
    start = head.index(b"\x08\x00\x18\x00")  # SOP Instance UID: keep what precedes, then ours and the nesting
    ours = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(uid) + 1) + uid.encode() + b"\x00"
    bad.append(f.write_part10(tmp_path / "nested.dcm", f.US, uid, "1.2.840.10008.1.2.1", [head[:start], ours, nested]))
    ok = f.save(f.make_us_single(np.ones((16, 16), np.uint8)), tmp_path / "ok.dcm")
    rsp = store(ing.port, bad + [ok])
    assert [int(r.Status) for r in rsp] == [0xC210] * 7 + [0]
    comments = [str(r.ErrorComment) for r in rsp[:7]]
    assert comments[:2] == ["Image has Pixel Data but Rows or Columns is 0."] * 2
    assert comments[2:4] == ["Image has Bits Allocated other than 1, 8, 16 or 32."] * 2
    assert comments[4:6] == ["Image has Samples per Pixel other than 1 or 3."] * 2
    assert comments[6].startswith("Sequences are nested deeper than 32 levels")
    assert ing.pipeline.wait_idle(20) and [c[1] for c in svc.calls] == [(16, 16)]
    assert list(ing.spool.failed_dir.glob("*.dcm")) == []


# --------------------------------------------------------------------------- issue 6: frame floods, fairness
def test_cine_over_max_frames_and_frames_over_max_pixels_are_refused_at_the_scp(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp()
    cine = f.save(f.make_us_multiframe(np.zeros((2000, 8, 8), np.uint8)), tmp_path / "cine.dcm")
    assert cine.stat().st_size < 200_000  # 2,000 tiny frames: cheap to send, 80 s of inference before
    (rsp,) = store(ing.port, [cine])
    assert int(rsp.Status) == 0xA700 and "max_frames" in rsp.ErrorComment
    ing2, svc2, _reg2 = start_scp(max_pixels=4000)
    big = f.save(f.make_us_single(np.zeros((64, 80), np.uint8)), tmp_path / "big.dcm")
    small = f.save(f.make_us_single(np.zeros((50, 80), np.uint8)), tmp_path / "small.dcm")
    big_rsp, small_rsp = store(ing2.port, [big, small])
    assert int(big_rsp.Status) == 0xA700 and "max_pixels" in big_rsp.ErrorComment
    assert int(small_rsp.Status) == 0
    assert ing.spool.pending_instances() == [] and svc.calls == []
    assert metric(reg, "medge_dicom_store_failures_total", status="0xA700") == 1
    assert ing2.pipeline.wait_idle(20) and [c[1] for c in svc2.calls] == [(50, 80)]


class SlowService(f.FakeService):
    """The fake model, 10 ms a frame (so that order under contention shows)."""

    def infer(self, image, *, model, source, timeout_s=30.0):
        time.sleep(0.01)
        return super().infer(image, model=model, source=source, timeout_s=timeout_s)


def test_one_peer_with_a_long_cine_cannot_monopolise_the_workers(start_scp, tmp_path: Path) -> None:
    ing, svc, _reg = start_scp(SlowService())  # one worker
    cine = f.save(f.make_us_multiframe(np.full((200, 8, 8), 7, np.uint8)), tmp_path / "cine.dcm")
    other = f.save(f.make_us_single(np.zeros((16, 16), np.uint8)), tmp_path / "other.dcm")
    assert [int(r.Status) for r in store(ing.port, [cine], bind="127.0.0.1")] == [0]
    assert [int(r.Status) for r in store(ing.port, [other], bind="127.0.0.2")] == [0]  # another peer, meanwhile
    assert ing.pipeline.wait_idle(30)
    shapes = [c[1] for c in svc.calls]
    assert shapes.count((8, 8)) == 200
    turn = shapes.index((16, 16))
    print(f"fair queue: the other peer's frame ran as call {turn + 1} of {len(shapes)}")
    # It waited at most for the cine's turns already under way, not for its 200 frames (FIFO would be 201st).
    assert turn <= 5 * FRAMES_PER_TURN


# --------------------------------------------------------------------------- issue 5: association slots
def test_idle_connections_from_one_peer_do_not_keep_a_modality_out(start_scp) -> None:
    ing, _svc, reg = start_scp(connect_timeout_s=5.0)  # max_associations 4, 2 per peer, 16 pending
    socks = idle(ing.port, 16)
    try:
        wait_until(lambda: ing.pending_connections == 2
                   and metric(reg, "medge_dicom_connections_refused_total", reason="peer_limit") == 14,
                   what="the listener to hold 2 of the 16 idle connections and refuse 14")
        ok, took = echo(ing.port)
        rc, took_dcmtk = echoscu(ing.port)
        print(f"16 idle connections from 127.0.0.2: C-ECHO took {took * 1000:.0f} ms (pynetdicom), "
              f"{took_dcmtk * 1000:.0f} ms (echoscu)")
        assert ok and took < 2.0
        assert rc == 0 and took_dcmtk < 2.0
        # Over max_associations_per_peer: closed at once, counted.
        assert metric(reg, "medge_dicom_connections_refused_total", reason="peer_limit") == 14
        assert sum(closed_within(s, 0.5) is not None for s in socks) == 14
    finally:
        close_all(socks)


def test_partial_pdus_hold_no_association_slot_and_are_closed_at_connect_timeout(start_scp) -> None:
    ing, _svc, reg = start_scp(connect_timeout_s=1.0)  # max_associations 4
    # Four peers, each sends the 6-byte header of an A-ASSOCIATE-RQ and nothing more.
    socks = [idle(ing.port, 1, source=f"127.0.0.{3 + i}", send=b"\x01\x00\x00\x00\x01\x00")[0] for i in range(4)]
    try:
        wait_until(lambda: ing.pending_connections == 4, what="the 4 partial A-ASSOCIATE-RQs to be pending")
        ok, took = echo(ing.port)
        print(f"4 partial A-ASSOCIATE-RQs: C-ECHO took {took * 1000:.0f} ms")
        assert ok and took < 2.0
        closed = [closed_within(s, 3.0) for s in socks]
        assert all(c is not None for c in closed), closed
        assert wait_metric(reg, "medge_dicom_connections_refused_total", 4, reason="timeout") == 4
    finally:
        close_all(socks)


def test_a_full_pending_set_evicts_its_oldest_and_protocol_errors_close_connections_at_once(start_scp) -> None:
    ing, _svc, reg = start_scp(connect_timeout_s=1.0, max_pending_connections=2, max_associations_per_peer=8)
    held = idle(ing.port, 2)
    try:
        assert wait_for(lambda: ing.pending_connections == 2, 2.0)
        held += idle(ing.port, 1)  # the set is full: the oldest goes, the newcomer waits its turn
        third = held[2]
        assert closed_within(held[0], 0.5) is not None
        assert wait_metric(reg, "medge_dicom_connections_refused_total", 1, reason="evicted") == 1
        assert closed_within(third, 0.1) is None
        assert all(closed_within(s, 3.0) is not None for s in (held[1], third))  # then the deadline frees them
        assert wait_metric(reg, "medge_dicom_connections_refused_total", 2, reason="timeout") == 2
        (pdata,) = idle(ing.port, 1, send=b"\x04\x00\x00\x00\x00\x10" + bytes(16))  # P-DATA before associating
        assert closed_within(pdata, 0.5) is not None
        assert wait_metric(reg, "medge_dicom_connections_refused_total", 1, reason="protocol") == 1
        assert echo(ing.port)[0]
    finally:
        close_all(held)


def test_idle_connections_from_many_addresses_are_evicted_oldest_first_for_a_modality(start_scp) -> None:
    ing, _svc, reg = start_scp(connect_timeout_s=5.0)  # 16 pending at most, 2 per peer
    socks = [idle(ing.port, 1, source=f"127.0.0.{10 + i}")[0] for i in range(16)]  # one per address: all admitted
    try:
        assert wait_for(lambda: ing.pending_connections == 16, 2.0)
        ok, took = echo(ing.port)
        assert ok and took < 2.0
        socks += idle(ing.port, 1, source="127.0.0.26")  # the set is full again
        assert wait_for(lambda: ing.pending_connections == 16, 2.0)
        rc, took_dcmtk = echoscu(ing.port)
        print(f"16 idle connections from 16 addresses: C-ECHO took {took * 1000:.0f} ms (pynetdicom), "
              f"{took_dcmtk * 1000:.0f} ms (echoscu)")
        assert rc == 0 and took_dcmtk < 2.0
        # Each newcomer evicted the oldest idle connection, counted; the others still wait.
        assert wait_metric(reg, "medge_dicom_connections_refused_total", 2, reason="evicted") == 2
        assert [closed_within(s, 0.5) is not None for s in socks[:2]] == [True, True]
        assert closed_within(socks[2], 0.05) is None
        assert metric(reg, "medge_dicom_connections_refused_total", reason="peer_limit") == 0
    finally:
        close_all(socks)


def test_stalled_pdus_end_their_associations_within_the_network_timeout(start_scp) -> None:
    ing, _svc, reg = start_scp(network_timeout_s=1.0)  # max_associations 4
    t0 = time.monotonic()
    stalled = []
    try:
        for i in range(4):  # every association slot: a P-DATA-TF that declares 1000 bytes and sends 10
            s = associate_raw(ing.port, f"127.0.0.{3 + i}")
            s.sendall(struct.pack(">BBI", 4, 0, 1000) + bytes(10))
            stalled.append(s)
        ok = False
        while not ok and time.monotonic() - t0 < 6.0:
            ok = echo(ing.port, timeout_s=1.0)[0]
            if not ok:
                time.sleep(0.05)
        took = time.monotonic() - t0
        print(f"4 stalled PDUs (network_timeout_s = 1): a C-ECHO succeeded {took:.2f} s after they started")
        assert ok and took < 2.0 + 1.0
        assert all(closed_within(s, 1.0) is not None for s in stalled)
        assert wait_metric(reg, "medge_dicom_associations_aborted_total", 4, reason="pdu_timeout") == 4
    finally:
        close_all(stalled)


def test_a_pdu_declaring_4_gib_is_refused_before_it_is_read(start_scp) -> None:
    ing, _svc, reg = start_scp()
    s = associate_raw(ing.port, "127.0.0.3")
    rss, size = vm_kib(os.getpid(), "VmRSS"), vm_kib(os.getpid(), "VmSize")
    tracemalloc.start()
    try:
        s.sendall(struct.pack(">BBI", 4, 0, 0xFFFFFFF0) + bytes(100))
        got, closed = read_until_closed(s, 3.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        s.close()
    grew_rss, grew_size = vm_kib(os.getpid(), "VmRSS") - rss, vm_kib(os.getpid(), "VmSize") - size
    print(f"4 GiB PDU header: closed after {closed} s; traced peak {peak / 2**20:.1f} MiB, "
          f"VmRSS {grew_rss / 1024:+.1f} MiB, VmSize {grew_size / 1024:+.1f} MiB")
    assert closed is not None and closed < 1.0
    assert got == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"  # A-ABORT: provider, invalid PDU parameter value
    assert peak < 16 << 20 and grew_rss < 64 << 10
    assert wait_metric(reg, "medge_dicom_associations_aborted_total", 1, reason="pdu_too_large") == 1
    assert echo(ing.port)[0]


def test_idle_tls_connections_do_not_block_the_listener(start_scp, certificate) -> None:
    cert, key = certificate
    ing, _svc, reg = start_scp(tls=DicomTlsConfig(cert=str(cert), key=str(key)), connect_timeout_s=2.0)
    socks = idle(ing.port, 16)  # TCP connected, never start the TLS handshake
    trickle = idle(ing.port, 1, source="127.0.0.3", send=b"\x16\x03\x01")  # a handshake that never finishes
    try:
        wait_until(lambda: ing.pending_connections == 3
                   and metric(reg, "medge_dicom_connections_refused_total", reason="peer_limit") == 14,
                   what="the listener to hold 2 idle connections and the trickle, and refuse 14")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ctx.check_hostname = False
        ok, took = echo(ing.port, tls=ctx)
        rc, took_dcmtk = echoscu(ing.port, "+tls", str(key), str(cert), "-ic")
        print(f"16 idle TLS connections: C-ECHO took {took * 1000:.0f} ms (pynetdicom), "
              f"{took_dcmtk * 1000:.0f} ms (echoscu +tls)")
        assert ok and took < 2.0
        assert rc == 0 and took_dcmtk < 2.0
        # The stalled handshake is cut at connect_timeout_s (the deadline covers the handshake too).
        assert closed_within(trickle[0], 4.0) is not None
        assert wait_metric(reg, "medge_dicom_connections_refused_total", 1, reason="timeout") >= 1
    finally:
        close_all(socks + trickle)


def test_real_scp_process_serves_a_modality_past_idle_connections_and_refuses_a_frame_flood(
    scp_process, tmp_path: Path
) -> None:
    _proc, port, spool = scp_process
    socks = idle(port, 16)
    try:
        # The child refuses all but 2 per peer at once (EOF: readable): then all 16 have reached its listener.
        wait_until(lambda: len(select.select(socks, [], [], 0)[0]) >= 14,
                   what="the child to refuse 14 of the 16 idle connections")
        rc, took = echoscu(port)
        print(f"real process, 16 idle connections: echoscu took {took * 1000:.0f} ms")
        assert rc == 0 and took < 2.0
    finally:
        close_all(socks)
    cine = f.make_us_multiframe(np.zeros((2000, 8, 8), np.uint8))
    (rsp,) = store(port, [f.save(cine, tmp_path / "cine.dcm")])
    assert int(rsp.Status) == 0xA700 and "max_frames" in rsp.ErrorComment
    assert not spool.joinpath("instances", f"{cine.SOPInstanceUID}.dcm").exists()


# --------------------------------------------------------------------------- poison pills
CHILD_PIPELINE = r"""
import os, pathlib, signal, sys
from prometheus_client import CollectorRegistry
from edge.egress.dicom.common import ModelInfo
from edge.ingest.dicom.scp import DicomIngest
from tests.edge import dicom_factory as f


class Dying(f.FakeService):
    def infer(self, image, *, model, source, timeout_s=30.0):
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does, in the middle of processing


svc = Dying() if sys.argv[2] == "die" else f.FakeService()
cfg = f.dicom_config(pathlib.Path(sys.argv[1]), max_attempts=3)
info = ModelInfo("us-lesion-seg", "1", "segmentation", ("lesion",))
ing = DicomIngest(cfg, svc, CollectorRegistry(), cfg.spool_dir, model_info=lambda name: info).start()
ing.pipeline.wait_idle(30)
ing.close()
print(len(svc.calls), flush=True)
"""


def test_an_instance_that_kills_the_daemon_is_quarantined_after_max_attempts(tmp_path: Path) -> None:
    from edge.ingest.dicom.spool import Spool

    spool = Spool(tmp_path / "spool" / "dicom")
    ds = f.make_us_single(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32))
    path = spool.store_instance(str(ds.SOPInstanceUID), [f.save(ds, tmp_path / "us.dcm").read_bytes()])

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", CHILD_PIPELINE, str(tmp_path), mode], cwd=REPO, env=child_env(),
            capture_output=True, text=True, timeout=60,
        )

    for start in (1, 2, 3):
        r = run("die")
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert spool.attempts(path) == start  # counted durably before processing began
        assert path.exists()
    r = run("live")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0"]  # not run a fourth time
    assert not path.exists() and not spool.attempts_path(path).exists()
    reason = (spool.failed_dir / f"{path.stem}.reason.txt").read_text()
    assert reason.startswith("max_attempts:") and "[dicom] max_attempts = 3" in reason
    assert (spool.failed_dir / path.name).exists()
    assert not any(p in reason + r.stderr for p in PATIENT)


def test_recovery_quarantines_at_max_attempts_and_runs_below_it(tmp_path: Path) -> None:
    from edge.ingest.dicom.spool import Spool

    cfg = f.dicom_config(tmp_path, max_attempts=2)
    spool = Spool(cfg.spool_dir / "dicom")
    a, b = (f.make_us_single(np.full((16, 16), i, np.uint8)) for i in (1, 2))
    pa = spool.store_instance(str(a.SOPInstanceUID), [f.save(a, tmp_path / "a.dcm").read_bytes()])
    pb = spool.store_instance(str(b.SOPInstanceUID), [f.save(b, tmp_path / "b.dcm").read_bytes()])
    spool.begin_attempt(pa)
    spool.begin_attempt(pa)  # two unfinished starts: at the limit
    spool.begin_attempt(pb)  # one: below it
    svc, reg = f.FakeService(), CollectorRegistry()
    with DicomIngest(cfg, svc, reg, cfg.spool_dir, model_info=INFOS.__getitem__).start() as ing:
        assert ing.pipeline.wait_idle(20)
    assert (spool.failed_dir / pa.name).exists() and len(svc.calls) == 1
    assert metric(reg, "medge_dicom_processing_failures_total", reason="max_attempts") == 1
    assert not spool.attempts_path(pb).exists()  # finished: its count is gone with it


class Overloaded(f.FakeService):
    """Answers ``overloaded`` for the first ``n`` calls (all of them with ``n < 0``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.tries = 0

    def infer(self, image, *, model, source, timeout_s=30.0):
        self.tries += 1
        if self.n < 0 or self.tries <= self.n:
            raise ProtocolError("overloaded", "The queue is full.")
        return super().infer(image, model=model, source=source, timeout_s=timeout_s)


def test_transient_errors_are_retried_and_never_quarantine(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp(Overloaded(3))
    p = f.save(f.make_us_single(np.arange(256, dtype=np.uint8).reshape(16, 16)), tmp_path / "us.dcm")
    assert [int(r.Status) for r in store(ing.port, [p])] == [0]
    assert ing.pipeline.wait_idle(20)
    assert svc.tries == 4 and len(list(ing.outbox.unsent_dir.glob("*.dcm"))) == 1
    assert sum(metric(reg, "medge_dicom_processing_failures_total", reason=r) for r in ("model", "internal")) == 0
    # Shutting down while the service stays overloaded: the instance waits in the spool, its attempt taken back.
    ing2, svc2, reg2 = start_scp(Overloaded(-1))
    assert [int(r.Status) for r in store(ing2.port, [p])] == [0]
    wait_until(lambda: svc2.tries >= 2, what="a retried attempt on the overloaded service")
    ing2.close()
    (left,) = ing2.spool.pending_instances()
    assert ing2.spool.attempts(left) == 0 and list(ing2.spool.failed_dir.iterdir()) == []


# --------------------------------------------------------------------------- error boundaries
class FailingFirst(f.FakeService):
    def infer(self, image, *, model, source, timeout_s=30.0):
        if not self.calls:
            self.calls.append(("boom", (), source))
            raise RuntimeError("unexpected")
        return super().infer(image, model=model, source=source, timeout_s=timeout_s)


def test_scp_worker_and_finaliser_keep_serving_after_unexpected_errors(
    start_scp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.ingest.dicom.pipeline as pipeline_module

    ing, svc, reg = start_scp(FailingFirst())
    files = [f.save(f.make_us_single(np.full((16, 16), i, np.uint8)), tmp_path / f"{i}.dcm") for i in range(4)]
    # SCP: an unexpected error in the handler is answered 0xC211 and counted; the next store works.
    real_store = ing.spool.store_instance
    calls = {"n": 0}

    def store_once_broken(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("unexpected")
        return real_store(*a, **k)

    monkeypatch.setattr(ing.spool, "store_instance", store_once_broken)
    rsp = store(ing.port, files[:2])
    assert [int(r.Status) for r in rsp] == [0xC211, 0]
    assert metric(reg, "medge_internal_errors_total", component="dicom_scp") == 1
    # Worker: the first inference raises; that instance is quarantined ("internal"), the next one runs.
    assert ing.pipeline.wait_idle(20)
    assert metric(reg, "medge_internal_errors_total", component="dicom_pipeline") == 1
    assert metric(reg, "medge_dicom_processing_failures_total", reason="internal") == 1
    # Finaliser: a full disk is transient (the series is tried again), an unexpected error fails the series.
    real_put, real_build = ing.outbox.put, pipeline_module.build_results
    puts = {"n": 0}

    def put_once_full(obj, **kw):
        puts["n"] += 1
        if puts["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(obj, **kw)

    monkeypatch.setattr(ing.outbox, "put", put_once_full)
    assert [int(r.Status) for r in store(ing.port, files[2:3])] == [0]
    assert ing.pipeline.wait_idle(20) and puts["n"] == 2
    assert metric(reg, "medge_dicom_processing_failures_total", reason="result") == 0

    def build_broken(*a, **k):
        raise ValueError("unexpected")

    monkeypatch.setattr(pipeline_module, "build_results", build_broken)
    assert [int(r.Status) for r in store(ing.port, files[3:4])] == [0]
    assert ing.pipeline.wait_idle(20)
    assert metric(reg, "medge_internal_errors_total", component="dicom_finaliser") == 1
    assert metric(reg, "medge_dicom_processing_failures_total", reason="result") == 1
    monkeypatch.setattr(pipeline_module, "build_results", real_build)
    assert echo(ing.port)[0]
    reasons = " ".join(p.read_text() for p in ing.spool.failed_dir.glob("*.txt"))
    assert not any(p in reasons for p in PATIENT)
