"""Orthanc as the real PACS: it pushes a study to the daemon and receives the results, exactly once.

One private Orthanc (tests/edge/_orthanc.py: own config, storage and free
ports) and one real ``medge serve`` process (the tiny fixture models) are
shared by the module. The daemon's only destination is that Orthanc.

* Orthanc C-STOREs a whole study (US images, a US cine, a CT series, a DX
  image and a third-party SEG) to the daemon: the store job succeeds (the SEG
  included), every routed instance is referenced by a result in Orthanc, each
  result was stored exactly once, and each is valid (dciodvfy, highdicom).
* Orthanc is stopped while the daemon makes results for a new study; they
  wait in the outbox, Orthanc starts again on the same ports and storage,
  the outbox drains, and each result was stored exactly once, none
  dead-lettered.

"Exactly once" is counted by Orthanc itself: its store journal (a Lua
``OnStoredInstance`` hook with ``OverwriteInstances``, see _orthanc.py) has a
line per C-STORE it accepted, a re-sent object included, across restarts.
"""

from __future__ import annotations

import io
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import highdicom as hd
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from edge.egress.dicom.common import ModelInfo, SourceResult
from edge.egress.dicom.seg import make_segmentation
from edge.tools.daemon_process import DaemonProcess, free_port, write_demo_config
from edge.tools.dicom_scu import send_paths
from tests.edge import dicom_factory as f
from tests.edge._orthanc import OrthancServer
from tests.edge.test_dicom_results import dciodvfy

pytestmark = pytest.mark.peer("Orthanc")

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
DESTINATION = "demo-pacs"  # the destination name write_demo_config gives
ROUTES = {"US": "tiny-seg", "CT": "tiny-seg", "DX": "tiny-det"}
WAIT_S = 60.0  # generous: two shared cores


def _poll(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """``condition()`` once it is truthy; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def _metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    with urllib.request.urlopen(url, timeout=5.0) as resp:  # noqa: S310 - loopback
        text = resp.read().decode("utf-8")
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _disc_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """uint8 speckle with one bright disc at a seeded place (something for tiny-seg to find)."""
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy, r = float(rng.uniform(0.3, 0.7)) * size, 0.5 * size, size * 0.15
    img = rng.integers(10, 60, (size, size))
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 220
    return img.astype(np.uint8)


def _square_image(size: int = 64) -> np.ndarray:
    """uint16 radiograph-like image with one bright square (something for tiny-det to find)."""
    img = np.full((size, size), 300, np.uint16)
    img[20:36, 24:40] = 3000
    return img


def _references(ds: Dataset) -> tuple[set[str], set[str]]:
    """(study UIDs, SOP instance UIDs) a SEG or SR result references, read through highdicom."""
    if ds.SOPClassUID == SEG_CLASS:
        uids = hd.seg.Segmentation.from_dataset(ds).get_source_image_uids()
        return {u[0] for u in uids}, {u[2] for u in uids}
    hd.sr.ComprehensiveSR.from_dataset(ds)  # reads back as TID 1500
    studies, instances = set(), set()
    for item in ds.CurrentRequestedProcedureEvidenceSequence:
        studies.add(str(item.StudyInstanceUID))
        for series in item.ReferencedSeriesSequence:
            instances.update(str(r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence)
    return studies, instances


class _Results:
    """The result objects Orthanc holds for one study (instances not in ``sources``), read once each."""

    def __init__(self, orthanc: OrthancServer, study_uid: str, sources: set[str]) -> None:
        self.orthanc, self.study_uid, self.sources = orthanc, study_uid, sources
        self.datasets: dict[str, Dataset] = {}  # SOPInstanceUID -> the file Orthanc stored
        self._seen: set[str] = set()  # Orthanc ids already looked at

    def refresh(self) -> dict[str, Dataset]:
        for oid in self.orthanc.find_instances(StudyInstanceUID=self.study_uid):
            if oid in self._seen:
                continue
            uid = self.orthanc.get(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"]
            if uid not in self.sources:
                self.datasets[uid] = dcmread(io.BytesIO(self.orthanc.instance_file(oid)))
            self._seen.add(oid)
        return self.datasets

    def referenced(self) -> set[str]:
        return set().union(*(_references(ds)[1] for ds in self.refresh().values()))


@pytest.fixture(scope="module")
def peers(fixture_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A private Orthanc and a ``medge serve`` whose one destination is that Orthanc."""
    work = tmp_path_factory.mktemp("orthanc-pacs")
    ports = {k: free_port() for k in ("ingest", "publish", "metrics", "dicom")}
    orthanc = OrthancServer(work / "orthanc", {"medge": ("MEDGE", "127.0.0.1", ports["dicom"])})
    cfg = write_demo_config(
        work / "medge.toml", engines_dir=fixture_engines, spool_dir=work / "spool", models=["tiny-seg", "tiny-det"],
        ports=ports, dicom=True, precision="fp32", routes=ROUTES, results_port=orthanc.dicom_port,
        results_aet=orthanc.aet,
    )
    with orthanc, DaemonProcess(cfg, ports["metrics"], work / "daemon.log") as daemon:
        try:
            daemon.wait_ready(60.0)
            yield SimpleNamespace(
                orthanc=orthanc, daemon=daemon, dicom_port=ports["dicom"],
                metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics",
                pending_dir=work / "spool" / "outbox" / "pending" / DESTINATION,
                dead_dir=work / "spool" / "outbox" / "dead-letter" / DESTINATION,
            )
        finally:
            print(f"daemon log tail:\n{daemon.log_tail(30)}\nOrthanc log tail:\n{orthanc.log_tail(10)}")


def _pending(p: SimpleNamespace) -> float:
    return _metric(p.metrics_url, "medge_outbox_pending", destination=DESTINATION)


def _check_results(results: dict[str, Dataset], study_uid: str, tmp_path: Path) -> None:
    """Each result Orthanc stored is valid, reads back and references only the source study."""
    for uid, ds in results.items():
        assert ds.SOPClassUID in (SEG_CLASS, COMPREHENSIVE_SR), f"unexpected result class {ds.SOPClassUID}"
        assert ds.StudyInstanceUID == study_uid
        studies, _ = _references(ds)
        assert studies == {study_uid}
        dciodvfy(ds, tmp_path, f"orthanc_{ds.Modality}_{uid[-12:]}")


def test_orthanc_pushes_a_study_with_a_seg_and_gets_each_result_exactly_once(
    peers: SimpleNamespace, tmp_path: Path
) -> None:
    orthanc: OrthancServer = peers.orthanc
    rng = np.random.default_rng(2026)
    study_uid = generate_uid()
    us = [f.make_us_single(_disc_image(rng), study_uid) for _ in range(2)]
    cine = f.make_us_multiframe(np.stack([_disc_image(rng) for _ in range(3)]), study_uid)
    ct = f.make_ct_series(3, 64, seed=5, study_uid=study_uid)
    dx = f.make_dx(_square_image(), study_uid)
    # A SEG some other system made of this study: forwarded with it, accepted by medge and not routed.
    upstream_seg = make_segmentation(
        [SourceResult(us[0], [1], (us[0].pixel_array > 128).astype(np.uint8)[None])],
        ModelInfo("upstream-ai", "7", "segmentation", ("lesion",)),
    )
    routed = us + [cine] + ct + [dx]
    uploads = routed + [upstream_seg]
    study_ids = {orthanc.upload(_part10(ds))["ParentStudy"] for ds in uploads}
    assert len(study_ids) == 1
    source_uids = {str(ds.SOPInstanceUID) for ds in uploads}

    url = peers.metrics_url
    unrouted_seg = _metric(url, "medge_dicom_unrouted_total", sop_class_uid=SEG_CLASS, action="accept")
    sent_before = _metric(url, "medge_outbox_sent_total", destination=DESTINATION)
    orthanc.barrier()  # the uploads are journaled: what follows is the push and its results
    journal_before = len(orthanc.journal())

    answer = orthanc.store_to("medge", sorted(study_ids))  # HTTP 500 (OrthancError) if any instance is refused
    assert answer["FailedInstancesCount"] == 0, answer
    assert answer["InstancesCount"] == len(uploads), answer

    results = _Results(orthanc, study_uid, source_uids)
    routed_uids = {str(ds.SOPInstanceUID) for ds in routed}
    _poll(lambda: routed_uids <= results.referenced(), "a result in Orthanc for every routed instance")
    _poll(lambda: _pending(peers) == 0, "the daemon's outbox to drain")
    orthanc.barrier()

    got = results.refresh()
    # Exactly once: Orthanc's journal has one C-STORE from MEDGE per result and nothing else.
    assert orthanc.stored("MEDGE", since=journal_before) == Counter({uid: 1 for uid in got})
    assert _metric(url, "medge_outbox_sent_total", destination=DESTINATION) - sent_before == len(got)
    # The SEG in the study was accepted (no refusal for want of a presentation context) and not processed.
    assert _metric(url, "medge_dicom_unrouted_total", sop_class_uid=SEG_CLASS, action="accept") == unrouted_seg + 1
    assert str(upstream_seg.SOPInstanceUID) not in results.referenced()

    # What each routed instance gave: a SEG per US image, one SEG for the CT series, SRs for the cine and DX.
    by_source = {src: [ds for ds in got.values() if src in _references(ds)[1]] for src in routed_uids}
    for ds in us:
        (res,) = by_source[str(ds.SOPInstanceUID)]
        assert res.SOPClassUID == SEG_CLASS and _references(res)[1] == {str(ds.SOPInstanceUID)}
    ct_segs = {id(r) for ds in ct for r in by_source[str(ds.SOPInstanceUID)]}
    assert len(ct_segs) == 1
    assert [r.SOPClassUID for r in by_source[str(ct[0].SOPInstanceUID)]] == [SEG_CLASS]
    for ds in (cine, dx):
        assert [r.SOPClassUID for r in by_source[str(ds.SOPInstanceUID)]] == [COMPREHENSIVE_SR]
    assert len(got) == len(us) + 1 + 2
    _check_results(got, study_uid, tmp_path)
    assert not list(peers.dead_dir.glob("*.dcm"))


def test_results_pending_across_an_orthanc_restart_arrive_exactly_once(
    peers: SimpleNamespace, tmp_path: Path
) -> None:
    orthanc: OrthancServer = peers.orthanc
    url = peers.metrics_url
    orthanc.barrier()  # also makes sure Orthanc holds something that must survive the restart
    held_before = set(orthanc.get("/instances"))
    journal_before = len(orthanc.journal())
    sent_before = _metric(url, "medge_outbox_sent_total", destination=DESTINATION)
    failures_before = _metric(url, "medge_outbox_failures_total", destination=DESTINATION)
    dead_before = _metric(url, "medge_outbox_dead_letter_total", destination=DESTINATION)
    orthanc.stop()

    rng = np.random.default_rng(7)
    study_uid = generate_uid()
    sources = [f.make_us_single(_disc_image(rng), study_uid) for _ in range(2)] + [f.make_dx(_square_image(), study_uid)]
    files = [f.save(ds, tmp_path / "in" / f"{i}.dcm") for i, ds in enumerate(sources)]
    report = send_paths(files, port=peers.dicom_port, called_ae="MEDGE", calling_ae="US_ROOM1")
    assert report.sent == len(sources), report.to_dict()
    # One SEG per US image, one SR for the DX image: all wait for the PACS, which refuses connections.
    expected = 3
    _poll(lambda: _pending(peers) == expected, f"{expected} results pending in the outbox")
    _poll(lambda: _metric(url, "medge_outbox_failures_total", destination=DESTINATION) > failures_before,
          "a failed delivery attempt while Orthanc is down")
    assert len(list(peers.pending_dir.glob("*.dcm"))) == expected

    orthanc.start()  # same ports, storage and index
    assert held_before <= set(orthanc.get("/instances")), "instances stored before the restart were lost"
    source_uids = {str(ds.SOPInstanceUID) for ds in sources}
    results = _Results(orthanc, study_uid, source_uids)
    _poll(lambda: _pending(peers) == 0, "the outbox to drain after Orthanc is back")
    _poll(lambda: source_uids <= results.referenced(), "a result in Orthanc for every instance")
    orthanc.barrier()

    got = results.refresh()
    assert len(got) == expected
    assert orthanc.stored("MEDGE", since=journal_before) == Counter({uid: 1 for uid in got})
    assert _metric(url, "medge_outbox_sent_total", destination=DESTINATION) - sent_before == expected
    assert _metric(url, "medge_outbox_dead_letter_total", destination=DESTINATION) == dead_before
    assert not list(peers.dead_dir.glob("*")) and not list(peers.pending_dir.glob("*.dcm"))
    _check_results(got, study_uid, tmp_path)
