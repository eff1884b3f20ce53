"""The outbox over DICOM TLS against real peers: DCMTK ``storescp --enable-tls`` and a pynetdicom TLS SCP.

A TLS problem (untrusted certificate, wrong name, missing client certificate)
keeps results pending and counted as failures, never dead-lettered; fixing the
configuration (or the CA file on disk) delivers them.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from edge.egress.dicom.outbox import Destination, Outbox
from edge.errors import ConfigError
from tests.conftest import peer_missing, peer_path
from tests.edge import dicom_factory as f
from tests.edge._pki import Pki, make_pki
from tests.edge.test_dicom_outbox import FAST, ScriptedSCP, metric, poll, results, wait_port

STORESCP = peer_path("storescp")


def _storescp_has_tls() -> bool:
    if STORESCP is None:
        return False
    out = subprocess.run([STORESCP, "--help"], capture_output=True, text=True, timeout=30)
    return "--enable-tls" in out.stdout + out.stderr


needs_dcmtk_tls = pytest.mark.peer("storescp")  # and built with TLS: checked by the storescp fixture


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("stranger"), "stranger")


class StoreSCP:
    """DCMTK ``storescp`` with TLS on an ephemeral port, writing to ``folder``."""

    def __init__(self, pki: Pki, folder: Path, require_client_cert: bool) -> None:
        self.port = f.free_port()
        self.folder = folder
        folder.mkdir()
        peer = ["+cf", str(pki.ca), "-rc"] if require_client_cert else ["-ic"]
        self.proc = subprocess.Popen(
            [STORESCP, "-od", str(folder), "-aet", "PACS", "+tls", str(pki.server_key), str(pki.server_cert),
             *peer, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def received(self) -> list[str]:
        return sorted(str(dcmread(p).SOPInstanceUID) for p in self.folder.iterdir())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def storescp(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    if not _storescp_has_tls():
        peer_missing(f"{STORESCP} has no TLS support (Debian package dcmtk has it)")
    started: list[StoreSCP] = []

    def start(require_client_cert: bool = False) -> StoreSCP:
        scp = StoreSCP(pki, tmp_path / f"pacs{len(started)}", require_client_cert)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.close()


def tls_scp(pki: Pki, require_client_cert: bool = False) -> ScriptedSCP:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if require_client_cert:
        ctx.load_verify_locations(cafile=str(pki.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ScriptedSCP([], ssl_context=ctx)


def tls_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.name == "edge.egress.dicom.outbox" and r.levelno == logging.WARNING and "TLS failed" in r.getMessage()
    ]


# ---------------------------------------------------------------------------------------------- DCMTK
@needs_dcmtk_tls
def test_delivers_over_tls_to_dcmtk_storescp(pki: Pki, storescp, tmp_path: Path) -> None:
    scp = storescp()
    reg = CollectorRegistry()
    objs = results(2)
    dest = Destination("pacs", "127.0.0.1", scp.port, "PACS", tls=True, tls_ca=str(pki.ca), tls_server_name="localhost")
    with Outbox(tmp_path / "outbox", [dest], reg, policy=FAST) as ob:
        for o in objs:
            ob.put(o)
        assert ob.wait_idle(20)
    assert scp.received() == sorted(str(o.SOPInstanceUID) for o in objs)
    assert metric(reg, "medge_outbox_sent_total", destination="pacs") == 2
    assert metric(reg, "medge_outbox_failures_total", destination="pacs") == 0


@needs_dcmtk_tls
def test_dcmtk_requiring_a_client_certificate_gets_ours(
    pki: Pki, storescp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mutual TLS: without our certificate storescp refuses (pending, counted); with it, it stores."""
    scp = storescp(require_client_cert=True)
    obj = results(1)[0]
    no_cert = Destination("pacs", "127.0.0.1", scp.port, "PACS", tls=True, tls_ca=str(pki.ca))
    reg = CollectorRegistry()
    with Outbox(tmp_path / "outbox", [no_cert], reg, policy=FAST) as ob:
        ob.put(obj)
        poll(lambda: metric(reg, "medge_outbox_failures_total", destination="pacs") >= 2, what="refused attempts")
        assert ob.pending_count() == 1 and ob.dead_letters("pacs") == []
    assert scp.received() == []
    assert len(tls_warnings(caplog)) == 1  # the reason, once
    with_cert = Destination(
        "pacs", "127.0.0.1", scp.port, "PACS", tls=True, tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert), tls_key=str(pki.client_key),
    )
    with Outbox(tmp_path / "outbox", [with_cert], CollectorRegistry(), policy=FAST) as ob:  # restart, fixed config
        assert ob.wait_idle(20)
    assert scp.received() == [str(obj.SOPInstanceUID)]


# ---------------------------------------------------------------------------------------------- pynetdicom
def test_mutual_tls_scp_sees_our_client_certificate(pki: Pki, tmp_path: Path) -> None:
    scp = tls_scp(pki, require_client_cert=True)
    dest = Destination(
        "pacs", "127.0.0.1", scp.port, "SCRIPTED", tls=True, tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert), tls_key=str(pki.client_key),
    )
    obj = results(1)[0]
    try:
        with Outbox(tmp_path / "outbox", [dest], CollectorRegistry(), policy=FAST) as ob:
            ob.put(obj)
            assert ob.wait_idle(20)
    finally:
        scp.close()
    assert scp.stored == [str(obj.SOPInstanceUID)] and scp.peer_subjects == ["medge-client"]


def _replace_ca(configured: Path, good: Pki) -> None:
    tmp = configured.with_suffix(".new")
    shutil.copyfile(good.ca, tmp)
    os.replace(tmp, configured)  # as a certificate deployment does: picked up without a restart


@pytest.mark.parametrize("case", ["untrusted CA", "system store", "wrong server name"])
def test_a_bad_server_certificate_keeps_results_pending_until_fixed(
    case: str, pki: Pki, stranger: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge.egress.dicom.outbox")
    scp = tls_scp(pki)
    configured_ca = tmp_path / "pacs-ca.pem"
    shutil.copyfile(stranger.ca, configured_ca)
    bad = {
        "untrusted CA": Destination("pacs", "127.0.0.1", scp.port, "SCRIPTED", tls=True, tls_ca=str(configured_ca)),
        "system store": Destination("pacs", "127.0.0.1", scp.port, "SCRIPTED", tls=True),
        "wrong server name": Destination(
            "pacs", "127.0.0.1", scp.port, "SCRIPTED", tls=True, tls_ca=str(pki.ca), tls_server_name="pacs.example.org"
        ),
    }[case]
    fixed = Destination("pacs", "127.0.0.1", scp.port, "SCRIPTED", tls=True, tls_ca=str(pki.ca))
    reg = CollectorRegistry()
    objs = results(2)
    try:
        ob = Outbox(tmp_path / "outbox", [bad], reg, policy=FAST)
        try:
            for o in objs:
                ob.put(o)
            poll(lambda: metric(reg, "medge_outbox_failures_total", destination="pacs") >= 3, what="failed attempts")
            assert ob.pending_count() == 2 and ob.dead_letters("pacs") == [] and scp.stored == []
            assert metric(reg, "medge_outbox_pending", destination="pacs") == 2
            (warning,) = tls_warnings(caplog)  # logged once, with the reason
            assert ("Hostname mismatch" if case == "wrong server name" else "certificate verify failed") in warning
            if case == "untrusted CA":  # fixed on disk: the running outbox picks the new CA up
                _replace_ca(configured_ca, pki)
                assert ob.wait_idle(20)
        finally:
            ob.close()
        if case != "untrusted CA":  # fixed in the config: a restart delivers what waited
            with Outbox(tmp_path / "outbox", [fixed], reg, policy=FAST) as ob:
                assert ob.wait_idle(20)
    finally:
        scp.close()
    assert sorted(scp.stored) == sorted(str(o.SOPInstanceUID) for o in objs)
    assert metric(reg, "medge_outbox_dead_letter_total", destination="pacs") == 0
    if case == "untrusted CA":
        assert any("accepts results again" in r.getMessage() for r in caplog.records)


def test_unusable_tls_files_are_a_config_error(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    bad = [
        Destination("pacs", "127.0.0.1", 11112, "PACS", tls=True, tls_ca=str(not_pem)),
        Destination("pacs", "127.0.0.1", 11112, "PACS", tls=True, tls_cert=str(pki.ca), tls_key=str(pki.client_key)),
    ]
    for dest in bad:
        with pytest.raises(ConfigError, match=r"dicom.destinations \(pacs\)"):
            Outbox(tmp_path / "outbox", [dest], CollectorRegistry(), policy=FAST, start=False)


def test_config_destinations_carry_their_tls_settings(pki: Pki) -> None:
    from edge.config import DicomDestination

    cfg = DicomDestination(
        name="pacs", host="pacs.local", port=2762, ae_title="PACS", tls=True, tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert), tls_key=str(pki.client_key), tls_server_name="pacs.example.org",
    )
    assert Destination.of(cfg) == Destination(
        "pacs", "pacs.local", 2762, "PACS", True, str(pki.ca), str(pki.client_cert), str(pki.client_key), "pacs.example.org"
    )
