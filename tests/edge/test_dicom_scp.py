"""The C-STORE SCP against real peers: DCMTK echoscu/storescu and pynetdicom's SCU."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.uid import JPEGLSNearLossless, RLELossless
from pynetdicom import AE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from edge.config import DicomRoute, DicomTlsConfig
from edge.egress.dicom.common import ModelInfo
from edge.ingest.dicom.scp import DicomIngest
from edge.tools.dicom_scu import send_paths
from tests.conftest import peer_path, require_peer, wait_until
from tests.edge import dicom_factory as f

ECHOSCU, STORESCU = peer_path("echoscu") or "echoscu", peer_path("storescu") or "storescu"
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
INFOS = {
    "us-lesion-seg": ModelInfo("us-lesion-seg", "1", "segmentation", ("lesion",)),
    "xray-nodule-det": ModelInfo("xray-nodule-det", "1", "detection", ("nodule",)),
}

pytestmark = pytest.mark.peer("echoscu", "storescu")


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., tuple[DicomIngest, f.FakeService, CollectorRegistry]]]:
    started: list[DicomIngest] = []

    def _start(spool_max_bytes: int | None = None, **dicom) -> tuple[DicomIngest, f.FakeService, CollectorRegistry]:
        dicom.setdefault("allowed_calling_aes", ("MODALITY", "PYSCU"))
        cfg = f.dicom_config(tmp_path, **dicom)
        svc, reg = f.FakeService(), CollectorRegistry()
        ing = DicomIngest(cfg, svc, reg, cfg.spool_dir, spool_max_bytes=spool_max_bytes, model_info=INFOS.__getitem__)
        started.append(ing.start())
        return ing, svc, reg

    yield _start
    for ing in started:
        ing.close()


def echoscu(port: int, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ECHOSCU, "-aet", calling, "-aec", "MEDGE", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30
    )


def storescu(port: int, files: list[Path], calling: str = "MODALITY", *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STORESCU, *options, "-aet", calling, "-aec", "MEDGE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def pyscu_store(port: int, items: list[Path], calling: str = "PYSCU") -> list[int]:
    """Send files as stored (no decode) with pynetdicom's SCU; returns the statuses."""
    from pynetdicom import _config

    pairs = []
    for p in items:
        meta = pydicom.filereader.read_file_meta_info(p)
        pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if pair not in pairs:
            pairs.append(pair)
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(s, t) for s, t in pairs] + [build_context(Verification)]
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGE")
    assert assoc.is_established
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # raw bytes, as sent
    try:
        return [int(assoc.send_c_store(p).Status) for p in items]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_echoscu_succeeds_and_a_disallowed_calling_ae_is_rejected(start_scp) -> None:
    ing, _svc, _reg = start_scp()
    ok = echoscu(ing.port, "MODALITY")
    assert ok.returncode == 0, ok.stderr
    bad = echoscu(ing.port, "INTRUDER")
    assert bad.returncode != 0
    assert "reject" in (bad.stdout + bad.stderr).lower()


def test_storescu_us_cine_ct_series_cr_dx_are_spooled_and_run(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp(frame_stride=2)
    src = tmp_path / "src"
    frames = np.stack([np.full((48, 64), 10 * i, np.uint8) for i in range(5)])
    files = [f.save(f.make_us_multiframe(frames), src / "us_mf.dcm")]
    files += [f.save(d, src / f"ct{i}.dcm") for i, d in enumerate(f.make_ct_series(3, 64))]
    xray = (np.arange(80 * 96).reshape(80, 96) % 4096).astype(np.uint16)
    files += [f.save(f.make_cr(xray), src / "cr.dcm"), f.save(f.make_dx(xray), src / "dx.dcm")]
    r = storescu(ing.port, files)
    assert r.returncode == 0, r.stderr
    assert metric(reg, "medge_dicom_instances_received_total", calling_ae="MODALITY") == len(files)
    assert ing.pipeline.wait_idle(30)
    calls = sorted(svc.calls)
    # cine frames 1, 3, 5 (stride 2) + 3 CT slices through the segmentation model; CR + DX through detection
    assert [c[0] for c in calls].count("us-lesion-seg") == 3 + 3
    assert [c for c in calls if c[0] == "xray-nodule-det"] == [("xray-nodule-det", (80, 96), "dicom")] * 2
    # Results are in the outbox (no destination configured: unsent/), sources are gone from the spool.
    kinds = sorted(dcmread(p, stop_before_pixels=True).Modality for p in (ing.outbox.unsent_dir).glob("*.dcm"))
    assert kinds == ["SEG", "SR", "SR", "SR"]
    assert ing.spool.pending_instances() == []


def test_compressed_transfer_syntaxes_are_accepted_as_sent_and_decoded(start_scp, tmp_path: Path) -> None:
    routes = tuple(DicomRoute(modality=m, model="us-lesion-seg") for m in ("CT", "MR", "OT", "NM", "US"))
    ing, svc, _reg = start_scp(routes=routes)
    names = [
        "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
        "JPEG2000.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm",
    ]
    files = [shutil.copy(TEST_FILES / n, tmp_path / n) for n in names]
    # JPEG-LS near-lossless and RLE ultrasound made here (pydicom's encoders).
    img = (np.add.outer(np.arange(40), np.arange(50)) % 200).astype(np.uint8)
    for ts, name in ((JPEGLSNearLossless, "us_jls_near.dcm"), (RLELossless, "us_rle.dcm")):
        ds = f.make_us_single(img)
        ds.compress(ts, **({"jls_error": 2} if ts == JPEGLSNearLossless else {}))
        files.append(f.save(ds, tmp_path / name))
    statuses = pyscu_store(ing.port, [Path(p) for p in files])
    assert statuses == [0] * len(files)
    # Stored byte-for-byte as sent: same transfer syntax in the spool as in the file.
    assert ing.pipeline.wait_idle(60)
    assert list(ing.spool.failed_dir.glob("*.dcm")) == [], [
        p.read_text() for p in ing.spool.failed_dir.glob("*.txt")
    ]
    shapes = [c[1] for c in svc.calls]
    assert (100, 100, 3) in shapes  # RGB (RLE, JPEG baseline YBR, JPEG lossless) reaches the model as RGB
    assert (40, 50) in shapes and (128, 128) in shapes and (64, 64) in shapes
    # Some of pydicom's files are one image in several transfer syntaxes with the same SOP Instance
    # UID: a resend replaces the spooled copy, so each distinct instance runs once.
    distinct = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert len(svc.calls) == len(distinct)


def test_full_spool_answers_out_of_resources(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp(spool_max_bytes=1000)
    p = f.save(f.make_us_single(np.zeros((64, 64), np.uint8)), tmp_path / "us.dcm")
    assert pyscu_store(ing.port, [p]) == [0xA700]
    assert ing.spool.pending_instances() == [] and svc.calls == []
    assert metric(reg, "medge_dicom_store_failures_total", status="0xA700") == 1
    assert metric(reg, "medge_dicom_instances_received_total", calling_ae="PYSCU") == 0


def test_storescu_over_spool_max_mb_is_refused_and_leaves_nothing_then_below_it_succeeds(
    start_scp, tmp_path: Path
) -> None:
    ing, svc, reg = start_scp(spool_max_mb=1)
    rng = np.random.default_rng(5)
    big = f.save(f.make_us_single(rng.integers(0, 255, (1024, 1100), dtype=np.uint8)), tmp_path / "big.dcm")
    assert big.stat().st_size > 1 << 20  # over the 1 MiB cap on its own
    r = storescu(ing.port, [big], "MODALITY", "-v")
    # storescu reports the refusal ("Received Store Response (Refused: OutOfResources)") and fails.
    assert r.returncode != 0 and "Refused: OutOfResources" in r.stderr, r.stderr
    # Nothing of it is left: not in instances/, not half-written in tmp/, never run.
    assert list(ing.spool.instances_dir.iterdir()) == [] and list(ing.spool.tmp_dir.iterdir()) == []
    assert svc.calls == []
    assert metric(reg, "medge_dicom_store_failures_total", status="0xA700") == 1
    assert metric(reg, "medge_dicom_instances_received_total", calling_ae="MODALITY") == 0
    small = f.save(f.make_us_single(rng.integers(0, 255, (256, 300), dtype=np.uint8)), tmp_path / "small.dcm")
    r = storescu(ing.port, [small], "MODALITY", "-v")
    assert r.returncode == 0 and "Received Store Response (Success)" in r.stderr, r.stderr
    assert metric(reg, "medge_dicom_instances_received_total", calling_ae="MODALITY") == 1
    assert ing.pipeline.wait_idle(20) and [c[1] for c in svc.calls] == [(256, 300)]


def test_spool_max_mb_counts_the_results_in_the_outbox(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp(spool_max_mb=1)
    # Results waiting in the outbox (here: unsent, no destination) count against the cap.
    ing.outbox.put(f.make_us_single(np.zeros((960, 1000), np.uint8)))
    assert ing.outbox.stored_bytes() > 900_000
    p = f.save(f.make_us_single(np.ones((400, 500), np.uint8)), tmp_path / "us.dcm")
    assert pyscu_store(ing.port, [p]) == [0xA700]
    # Clearing the outbox by hand is noticed (re-counted before refusing) without a restart.
    for q in ing.outbox.unsent_dir.glob("*.dcm"):
        q.unlink()
    ing.spool.RECOUNT_INTERVAL_S = 0.0
    assert pyscu_store(ing.port, [p]) == [0x0000]


def test_spool_min_free_mb_is_the_disk_reserve(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp(spool_min_free_mb=1 << 40)  # 1 EiB: more than any disk has free
    p = f.save(f.make_us_single(np.ones((64, 64), np.uint8)), tmp_path / "us.dcm")
    assert pyscu_store(ing.port, [p]) == [0xA700]
    assert list(ing.spool.instances_dir.iterdir()) == [] and list(ing.spool.tmp_dir.iterdir()) == []
    assert svc.calls == [] and metric(reg, "medge_dicom_store_failures_total", status="0xA700") == 1


def test_broken_dataset_gets_a_failure_status_and_the_scp_keeps_serving(start_scp, tmp_path: Path) -> None:
    ing, _svc, _reg = start_scp()
    good = f.save(f.make_us_single(np.zeros((64, 64), np.uint8)), tmp_path / "good.dcm")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:-1500])  # pixel data cut short
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(good.read_bytes()[:400] + np.random.default_rng(1).bytes(3000))
    assert pyscu_store(ing.port, [broken, garbage, good]) == [0xC210, 0xC210, 0x0000]
    assert echoscu(ing.port, "MODALITY").returncode == 0
    assert ing.pipeline.wait_idle(20)
    assert len(list(ing.outbox.unsent_dir.glob("*.dcm"))) == 1


def test_unrouted_instances_are_refused_or_accepted_as_configured(start_scp, tmp_path: Path) -> None:
    mr = shutil.copy(TEST_FILES / "MR_small_implicit.dcm", tmp_path / "mr.dcm")
    ing, svc, reg = start_scp(unrouted="reject")
    assert pyscu_store(ing.port, [Path(mr)]) == [0x0122]
    ing2, svc2, reg2 = start_scp(unrouted="accept")
    assert pyscu_store(ing2.port, [Path(mr)]) == [0x0000]
    assert ing2.spool.pending_instances() == [] and svc2.calls == []
    sop = "1.2.840.10008.5.1.4.1.1.4"
    assert metric(reg, "medge_dicom_unrouted_total", sop_class_uid=sop, action="reject") == 1
    assert metric(reg2, "medge_dicom_unrouted_total", sop_class_uid=sop, action="accept") == 1


def test_medge_send_dicom_sends_a_folder(start_scp, tmp_path: Path) -> None:
    ing, _svc, reg = start_scp(allowed_calling_aes=("MEDGE-SEND",))
    src = tmp_path / "folder"
    for i in range(3):
        f.save(f.make_us_single(np.full((32, 32), i, np.uint8)), src / "sub" / f"{i}.dcm")
    (src / "notes.txt").write_text("not dicom")
    report = send_paths([src], port=ing.port)
    assert (report.sent, report.failed, len(report.skipped)) == (3, 0, 1)
    assert metric(reg, "medge_dicom_instances_received_total", calling_ae="MEDGE-SEND") == 3


def test_tls_association(start_scp, tmp_path: Path) -> None:
    openssl = require_peer("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )
    ing, _svc, _reg = start_scp(tls=DicomTlsConfig(cert=str(cert), key=str(key)))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ctx.check_hostname = False
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", ing.port, ae_title="MEDGE", tls_args=(ctx, None))
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert echoscu(ing.port, "MODALITY").returncode != 0  # plain TCP is not spoken


def test_association_limit_and_release_on_network_timeout(start_scp) -> None:
    ing, _svc, _reg = start_scp(max_associations=1, network_timeout_s=0.5)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", ing.port, ae_title="MEDGE")
    assert held.is_established
    assert echoscu(ing.port, "MODALITY").returncode != 0  # over the limit: rejected
    # Idle past the network timeout: the SCP releases (A-RELEASE), it does not abort.
    wait_until(lambda: not held.is_established, timeout_s=5, what="the SCP to end the idle association")
    assert held.is_released and not held.is_aborted
    assert echoscu(ing.port, "MODALITY").returncode == 0  # the slot is free again


def test_medge_send_dicom_cli(start_scp, tmp_path: Path, capsys) -> None:
    from edge.cli import main

    ing, _svc, _reg = start_scp(allowed_calling_aes=())
    f.save(f.make_us_single(np.zeros((16, 16), np.uint8)), tmp_path / "a.dcm")
    assert main(["send", "dicom", "--port", str(ing.port), "--json", str(tmp_path / "a.dcm")]) == 0
    assert '"sent": 1' in capsys.readouterr().out
    assert main(["send", "dicom", "--port", str(ing.port), "--aet", "WRONG", str(tmp_path / "a.dcm")]) != 0


def test_port_in_use_is_a_clear_error(start_scp, tmp_path: Path) -> None:
    from edge.errors import MedgeError

    ing, _svc, _reg = start_scp()
    cfg = f.dicom_config(tmp_path / "second", port=ing.port)
    second = DicomIngest(cfg, f.FakeService(), CollectorRegistry(), cfg.spool_dir, model_info=INFOS.__getitem__)
    with pytest.raises(MedgeError, match="cannot listen"):
        second.start()


def test_restart_after_inference_reuses_saved_results(tmp_path: Path) -> None:
    """Crash after inference but before the series completed: the restart does not run the model again."""
    src = tmp_path / "src"
    files = [f.save(d, src / f"ct{i}.dcm") for i, d in enumerate(f.make_ct_series(2, 32))]
    cfg = f.dicom_config(tmp_path, series_idle_s=3600.0)  # the series never completes in the first run
    svc = f.FakeService()
    first = DicomIngest(cfg, svc, CollectorRegistry(), cfg.spool_dir, model_info=INFOS.__getitem__).start()
    try:
        assert storescu(first.port, files).returncode == 0
        wait_until(lambda: len(list(first.spool.results_dir.glob("*.npz"))) == 2, timeout_s=20,
                   what="both saved inference results")
    finally:
        first.close()
    assert len(svc.calls) == 2 and len(first.spool.pending_instances()) == 2
    cfg2 = f.dicom_config(tmp_path, series_idle_s=0.2)
    refusing = f.FakeService(fail_model="us-lesion-seg")  # would fail if asked again
    with DicomIngest(cfg2, refusing, CollectorRegistry(), cfg2.spool_dir, model_info=INFOS.__getitem__).start() as second:
        assert second.pipeline.wait_idle(20)
        assert refusing.calls == []
        assert [dcmread(p).Modality for p in second.outbox.unsent_dir.glob("*.dcm")] == ["SEG"]
        assert second.spool.pending_instances() == []


def test_concurrent_associations_each_get_their_series(start_scp, tmp_path: Path) -> None:
    # All three senders are on 127.0.0.1: one peer address, so its per-peer limit must allow three.
    ing, svc, reg = start_scp(max_associations=4, max_associations_per_peer=4)
    batches = []
    for b in range(3):
        batches.append([f.save(d, tmp_path / f"s{b}" / f"{i}.dcm") for i, d in enumerate(f.make_ct_series(4, 32, seed=b))])
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "MODALITY", "-aec", "MEDGE", "127.0.0.1", str(ing.port), *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for files in batches
    ]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert metric(reg, "medge_dicom_instances_received_total", calling_ae="MODALITY") == 12
    assert ing.pipeline.wait_idle(30)
    segs = [dcmread(p) for p in ing.outbox.unsent_dir.glob("*.dcm")]
    assert sorted(len(s.ReferencedSeriesSequence[0].ReferencedInstanceSequence) for s in segs) == [4, 4, 4]
    assert len(svc.calls) == 12


def test_monochrome1_and_rescale_reach_the_model_in_display_order(start_scp, tmp_path: Path) -> None:
    ing, svc, _reg = start_scp()
    raw = (np.arange(32 * 40).reshape(32, 40) % 1000).astype(np.uint16)
    cr = f.make_cr(raw)
    cr.PhotometricInterpretation = "MONOCHROME1"  # higher value = darker, as many CR plates store it
    cr.RescaleSlope, cr.RescaleIntercept = 2, -100
    assert storescu(ing.port, [f.save(cr, tmp_path / "cr_m1.dcm")]).returncode == 0
    assert ing.pipeline.wait_idle(20)
    (seen,) = svc.images
    modality = raw.astype(np.float32) * 2 - 100
    # Inverted so that higher always means brighter, in modality units.
    assert np.allclose(seen, modality.max() + modality.min() - modality)


def test_unrouted_accept_takes_every_storage_class_a_study_may_hold(start_scp, tmp_path: Path) -> None:
    """Forwarding a whole study: SR, SEG, medge's own results and retired US classes get a context (issue 10 item 4)."""
    from edge.ingest.dicom.scp import RETIRED_STORAGE_SOP_CLASSES, accepted_sop_classes

    sr = Path(shutil.copy(TEST_FILES / "test-SR.dcm", tmp_path / "sr.dcm"))
    retired = f.make_us_single(np.zeros((32, 32), np.uint8))
    retired.SOPClassUID = RETIRED_STORAGE_SOP_CLASSES["UltrasoundImageStorageRetired"]
    retired.file_meta.MediaStorageSOPClassUID = retired.SOPClassUID
    old_us = f.save(retired, tmp_path / "retired-us.dcm")
    seg = f.make_us_single(np.zeros((32, 32), np.uint8))  # any data set under the SEG class: it is not routed
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.file_meta.MediaStorageSOPClassUID = seg.SOPClassUID
    seg.Modality = "SEG"
    seg_path = f.save(seg, tmp_path / "seg.dcm")
    ing, svc, reg = start_scp(unrouted="accept")
    assert pyscu_store(ing.port, [sr, seg_path]) == [0x0000, 0x0000]
    assert svc.calls == [] and ing.spool.pending_instances() == []
    assert metric(reg, "medge_dicom_unrouted_total", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", action="accept") == 1
    # The retired US class is routed like US (Modality US) and processed.
    assert pyscu_store(ing.port, [old_us]) == [0x0000]
    assert len(accepted_sop_classes("accept")) > 150
    # With "reject", only the image classes medge can route get a context: the SR is refused at association.
    ing2, _svc2, _reg2 = start_scp(unrouted="reject")
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11")
    assoc = ae.associate("127.0.0.1", ing2.port, ae_title="MEDGE")
    try:
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()
