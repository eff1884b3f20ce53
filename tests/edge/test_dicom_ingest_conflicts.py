"""What the DICOM ingest does with instances that conflict or could never be referenced.

- the same SOP Instance UID on another object (study, series, SOP class,
  patient) while the first is pending: refused with 0x0111, never lost;
  the same object again: success, processed once;
- a series whose instances name two patients: one result per patient;
- missing, empty, over-long or malformed key UIDs: 0xC210 at C-STORE;
- a broken rescale or palette: a ``decode`` failure, not an internal one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from edge.egress.dicom.common import ModelInfo
from edge.errors import DataError
from edge.ingest.dicom.pixels import frame_to_array
from edge.ingest.dicom.scan import KeyUidError, check_key_uids, scan_encoded, valid_uid
from edge.ingest.dicom.spool import Spool
from edge.ingest.dicom.scp import DicomIngest
from tests.edge import dicom_factory as f

INFOS = {
    "us-lesion-seg": ModelInfo("us-lesion-seg", "1", "segmentation", ("lesion",)),
    "xray-nodule-det": ModelInfo("xray-nodule-det", "1", "detection", ("nodule",)),
}
EXPLICIT = "1.2.840.10008.1.2.1"


class GatedService(f.FakeService):
    """FakeService whose answers wait for ``gate`` (so the first instance stays pending)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def infer(self, image, *, model, source, timeout_s=30.0):
        assert self.gate.wait(10), "the test never opened the gate"
        return super().infer(image, model=model, source=source, timeout_s=timeout_s)


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., tuple[DicomIngest, f.FakeService, CollectorRegistry]]]:
    started: list[DicomIngest] = []

    def _start(svc: f.FakeService | None = None, **dicom) -> tuple[DicomIngest, f.FakeService, CollectorRegistry]:
        dicom.setdefault("allowed_calling_aes", ("PYSCU",))
        cfg = f.dicom_config(tmp_path, **dicom)
        svc, reg = svc or f.FakeService(), CollectorRegistry()
        ing = DicomIngest(cfg, svc, reg, cfg.spool_dir, model_info=INFOS.__getitem__)
        started.append(ing.start())
        return ing, svc, reg

    yield _start
    for ing in started:
        ing.close()


def store(port: int, paths: list[Path]) -> list[tuple[int, str]]:
    """Send files as stored (no decode, no validation); returns (status, error comment) per file."""
    return [(int(r.Status), str(r.get("ErrorComment", ""))) for r in f.c_store(port, paths)]


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def results(ing: DicomIngest) -> list[Dataset]:
    return [dcmread(p) for p in sorted(ing.outbox.unsent_dir.glob("*.dcm"))]


def referenced(sr: Dataset) -> list[str]:
    return [str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
            for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence]


def xray() -> np.ndarray:
    return (np.arange(48 * 64).reshape(48, 64) % 4000).astype(np.uint16)


# --------------------------------------------------------------------------- same SOP Instance UID
def test_same_sop_uid_on_another_object_is_refused_while_pending_and_a_resend_is_harmless(
    start_scp, tmp_path: Path
) -> None:
    ing, svc, reg = start_scp(GatedService())
    a = f.make_dx(xray())
    b = f.make_dx(xray(), study_uid=str(a.StudyInstanceUID))
    b.SOPInstanceUID = a.SOPInstanceUID  # another series of the study, same SOP Instance UID
    c = f.make_us_single(np.full((40, 50), 90, np.uint8), study_uid=str(a.StudyInstanceUID))
    c.SOPInstanceUID = a.SOPInstanceUID  # an ultrasound image, same SOP Instance UID
    d = f.make_dx(xray(), study_uid=str(a.StudyInstanceUID))
    d.SeriesInstanceUID, d.SOPInstanceUID, d.PatientID = a.SeriesInstanceUID, a.SOPInstanceUID, "OTHER-PATIENT"
    paths = [f.save(ds, tmp_path / f"{n}.dcm") for n, ds in zip("abcd", (a, b, c, d))]
    answers = store(ing.port, [paths[0], paths[0], paths[1], paths[2], paths[3]])
    assert [s for s, _ in answers] == [0x0000, 0x0000, 0x0111, 0x0111, 0x0111], answers
    assert "SOP Instance UID" in answers[2][1] and "OTHER" not in " ".join(c for _, c in answers)
    assert metric(reg, "medge_dicom_store_failures_total", status="0x0111") == 3
    svc.gate.set()
    assert ing.pipeline.wait_idle(10)
    (sr,) = results(ing)  # the first object, processed once, its result intact
    assert [c[0] for c in svc.calls] == ["xray-nodule-det"]
    assert sr.Modality == "SR" and referenced(sr) == [str(a.SOPInstanceUID)]
    assert str(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID) == str(
        a.SeriesInstanceUID)
    # Once the first is done, the other object is taken and processed as what it is.
    assert store(ing.port, [paths[2]]) == [(0x0000, "")]
    assert ing.pipeline.wait_idle(10)
    assert [c[0] for c in svc.calls] == ["xray-nodule-det", "us-lesion-seg"]
    assert ing.spool.pending_instances() == [] and list(ing.spool.failed_dir.iterdir()) == []


def test_recovered_instances_keep_their_identity_against_a_conflicting_object(tmp_path: Path) -> None:
    a = f.make_dx(xray())
    c = f.make_us_single(np.full((40, 50), 90, np.uint8), study_uid=str(a.StudyInstanceUID))
    c.SOPInstanceUID = a.SOPInstanceUID
    pa, pc = f.save(a, tmp_path / "a.dcm"), f.save(c, tmp_path / "c.dcm")
    cfg = f.dicom_config(tmp_path, allowed_calling_aes=("PYSCU",))
    first = DicomIngest(cfg, None, CollectorRegistry(), cfg.spool_dir)  # receive-only: nothing processed
    first.start()
    try:
        assert store(first.port, [pa]) == [(0x0000, "")]
    finally:
        first.close()
    svc = GatedService()
    with DicomIngest(cfg, svc, CollectorRegistry(), cfg.spool_dir, model_info=INFOS.__getitem__).start() as second:
        assert [s for s, _ in store(second.port, [pc])] == [0x0111]
        svc.gate.set()
        assert second.pipeline.wait_idle(10)
        assert [m for m, *_ in svc.calls] == ["xray-nodule-det"]


# --------------------------------------------------------------------------- two patients in a series
@pytest.mark.parametrize("modality", ["DX", "US"])
def test_a_series_naming_two_patients_gets_one_result_per_patient(start_scp, tmp_path: Path, modality: str) -> None:
    ing, _svc, _reg = start_scp()
    if modality == "DX":
        first, second = f.make_dx(xray()), f.make_dx(xray()[::-1].copy())
    else:
        first = f.make_us_single(np.tile(np.arange(50, dtype=np.uint8) * 5, (40, 1)))
        second = f.make_us_single(np.tile(np.arange(50, dtype=np.uint8)[::-1] * 5, (40, 1)))
    second.StudyInstanceUID, second.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
    second.PatientID, second.PatientName = "SECOND-PATIENT", "Second^Patient"
    paths = [f.save(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate((first, second))]
    assert [s for s, _ in store(ing.port, paths)] == [0, 0]
    assert ing.pipeline.wait_idle(10)
    out = results(ing)
    assert len(out) == 2, [r.Modality for r in out]
    by_patient = {str(r.PatientID): r for r in out}
    assert set(by_patient) == {str(first.PatientID), "SECOND-PATIENT"}
    assert len({str(r.SeriesInstanceUID) for r in out}) == 2  # a result series holds one patient too
    for src in (first, second):
        r = by_patient[str(src.PatientID)]
        assert str(r.PatientName) == str(src.PatientName)
        if r.Modality == "SR":
            refs = referenced(r)
        else:
            refs = [str(i.ReferencedSOPInstanceUID) for s in r.ReferencedSeriesSequence
                    for i in s.ReferencedInstanceSequence]
        assert refs == [str(src.SOPInstanceUID)]


# --------------------------------------------------------------------------- key UIDs
def _with(attr: str, value: str | None) -> Dataset:
    ds = f.make_dx(xray())
    if value is None:
        delattr(ds, attr)
    else:
        ds[attr].value = value
    return ds


BAD_UIDS = [
    ("StudyInstanceUID", None, "Study Instance UID missing or empty"),
    ("StudyInstanceUID", "", "Study Instance UID missing or empty"),
    ("StudyInstanceUID", "ZELDA.CANARY", "Study Instance UID not a valid UID"),
    ("SeriesInstanceUID", None, "Series Instance UID missing or empty"),
    ("SeriesInstanceUID", "1.2.03.4", "Series Instance UID not a valid UID"),
    ("SOPInstanceUID", "../../../../tmp/pwned", "SOP Instance UID not a valid UID"),
    ("SOPInstanceUID", "1." + "2" * 64, "SOP Instance UID longer than 64 characters"),
    ("SOPInstanceUID", "1..2", "SOP Instance UID not a valid UID"),
]


@pytest.mark.parametrize("attr, value, comment", BAD_UIDS)
def test_scan_refuses_missing_empty_long_or_malformed_key_uids(attr: str, value: str | None, comment: str) -> None:
    info = scan_encoded(f.encode_dataset(_with(attr, value), EXPLICIT), EXPLICIT)
    with pytest.raises(KeyUidError) as err:
        check_key_uids(info)
    assert err.value.comment == comment
    assert not value or value not in str(err.value)  # the message never quotes the value


def test_valid_uid() -> None:
    assert valid_uid("0.1.2") and valid_uid("1.2.840.10008.5.1.4.1.1.7") and valid_uid("1." + "2" * 62)
    for bad in ("", "1.", ".1", "1..2", "01.2", "1.2a", "1 .2", "1.2\\1.3", "1." + "2" * 63):
        assert not valid_uid(bad), bad


def test_key_uids_are_refused_at_c_store_with_0xc210_and_no_traceback(start_scp, tmp_path: Path) -> None:
    ing, svc, reg = start_scp()
    cases = [c for c in BAD_UIDS if "longer" not in c[2]]  # pynetdicom's SCU will not send a UID over 64
    paths = [f.save(_with(a, v), tmp_path / f"{i}.dcm") for i, (a, v, _) in enumerate(cases)]
    answers = store(ing.port, paths)
    assert answers == [(0xC210, c) for _a, _v, c in cases]
    assert metric(reg, "medge_dicom_store_failures_total", status="0xC210") == len(cases)
    assert metric(reg, "medge_internal_errors_total", component="dicom_scp") == 0
    assert list(ing.spool.instances_dir.glob("*.dcm")) == [] and svc.calls == []
    # Unrouted and not stored, nothing references it: still accepted and dropped.
    us = f.make_us_single(np.full((8, 8), 9, np.uint8))
    us.Modality, us.StudyInstanceUID = "XA", "ZELDA.CANARY"
    assert store(ing.port, [f.save(us, tmp_path / "xa.dcm")]) == [(0, "")]


def test_a_spooled_instance_with_a_bad_key_uid_is_quarantined_at_recovery(tmp_path: Path) -> None:
    ds = _with("SeriesInstanceUID", "1.2.03")  # spooled by a version that did not check
    cfg = f.dicom_config(tmp_path)
    Spool(cfg.spool_dir / "dicom").store_instance(str(ds.SOPInstanceUID), [f.save(ds, tmp_path / "a.dcm").read_bytes()])
    svc, reg = f.FakeService(), CollectorRegistry()
    with DicomIngest(cfg, svc, reg, cfg.spool_dir, model_info=INFOS.__getitem__).start() as ing:
        assert metric(reg, "medge_dicom_processing_failures_total", reason="unreadable") == 1
        (reason,) = ing.spool.failed_dir.glob("*.reason.txt")
        assert "Series Instance UID is not a valid UID" in reason.read_text() and "1.2.03" not in reason.read_text()
    assert svc.calls == []


# --------------------------------------------------------------------------- broken LUTs
def test_a_broken_rescale_or_palette_is_a_decode_error() -> None:
    ds = f.make_dx(xray())
    ds.RescaleIntercept = 0.0
    ds[0x00281053] = RawDataElement(Tag(0x00281053), "DS", 4, b"abc ", 0, False, True)  # a DS that is no number
    with pytest.raises(DataError, match="modality LUT"):
        frame_to_array(ds, ds.pixel_array)
    ds.RescaleSlope = "1e308"
    with pytest.raises(DataError, match="not finite"):
        frame_to_array(ds, ds.pixel_array)
    pal = f.make_dx(xray())
    pal.PhotometricInterpretation = "PALETTE COLOR"
    for c in "Red", "Green", "Blue":
        setattr(pal, f"{c}PaletteColorLookupTableDescriptor", [256, 0, 1])  # 1 bit per entry: no such dtype
        setattr(pal, f"{c}PaletteColorLookupTableData", b"\x00\x01")
    with pytest.raises(DataError, match="palette"):
        frame_to_array(pal, pal.pixel_array.astype(np.uint8))


def test_a_broken_rescale_goes_to_failed_as_decode_not_internal(start_scp, tmp_path: Path) -> None:
    ing, _svc, reg = start_scp()
    ds = f.make_dx(xray())
    ds.RescaleIntercept = 0.0
    ds.RescaleSlope = "1e308"
    assert store(ing.port, [f.save(ds, tmp_path / "huge.dcm")]) == [(0, "")]
    assert ing.pipeline.wait_idle(10)
    assert metric(reg, "medge_dicom_processing_failures_total", reason="decode") == 1
    assert metric(reg, "medge_dicom_processing_failures_total", reason="internal") == 0
    (reason,) = ing.spool.failed_dir.glob("*.reason.txt")
    assert reason.read_text().startswith("decode: ")
