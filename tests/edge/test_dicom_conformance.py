"""DICOM conformance corpus: real files from many devices through the production code paths.

The corpus (docs/dicom.md, "Conformance statement"; tests/data/dicom-corpus/README.md):

- every storage instance among pydicom's own test files (``pydicom/data/test_files``
  and ``charset_files``, shipped inside the pydicom wheel: no network);
- a small selection of the public pydicom-data repository, committed under
  ``tests/data/dicom-corpus/`` (US cine RLE with a palette, US JPEG lossless with
  ultrasound regions, US 16-bit segmented palette, US JPEG 2000 lossy, CR JPEG 2000,
  Enhanced MR RLE);
- synthetic instances for what no public file has: ultrasound with Pixel Spacing and/or
  a Frame of Reference but no image plane (medge's own demo data among them) and DX
  (:mod:`tests.edge.test_dicom_results_vendors`).

Routing as a typical installation: US, CT, MR to a segmentation model, CR, DX to a
detection model, everything else unrouted.

**Routed** files (one test per file): read and decoded as the pipeline does
(:func:`edge.ingest.dicom.part10.read_spooled`, :func:`edge.ingest.dicom.pixels.decode_frame`,
:func:`edge.ingest.dicom.pixels.frame_to_array`), masks/boxes from the deterministic
:class:`tests.edge.dicom_factory.FakeService`, results made by
:func:`edge.egress.dicom.results.build_results` and :func:`make_overlay`; each result
passes ``dciodvfy`` with no error (warnings only of the kinds in :data:`ALLOWED_WARNINGS`,
each justified there and in docs/dicom.md), reads back with ``highdicom.seg.segread`` /
``highdicom.sr.srread`` / ``highdicom.imread``, and references its source (study, series,
instance, frame numbers).

**Through the real SCP** (one test per file, ``unrouted = "accept"``): every storage
file gets a presentation context and an answer: success and dropped (unrouted),
success and processed into results (routed), success and quarantined with a reason
(routed, but holds no pixel data: :data:`QUARANTINED`), or refused with the documented
status (:data:`REFUSED`).
"""

from __future__ import annotations

import math
import subprocess
import warnings as pywarnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import highdicom as hd
import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pynetdicom import AE, _config

from edge.config import DicomRoute
from edge.egress.dicom.common import ModelInfo, SourceResult
from edge.egress.dicom.outlines import mask_outlines
from edge.egress.dicom.results import build_results
from edge.egress.dicom.sc import make_overlay
from edge.errors import DataError
from edge.ingest.dicom.part10 import read_spooled
from edge.ingest.dicom.pixels import decode_frame, frame_to_array, number_of_frames
from edge.ingest.dicom.routing import Router
from edge.ingest.dicom.scan import ScanLimits, SizeLimitError, scan_encoded, split_part10
from edge.ingest.dicom.scp import DicomIngest
from tests.conftest import require_peer
from tests.edge import dicom_factory as f
from tests.edge import test_dicom_results_vendors as V
from tests.edge.test_dicom_results import ALLOWED_WARNINGS as RESULT_WARNINGS
from tests.edge.test_dicom_results import DciodvfyWarning

PYDICOM_DATA = Path(pydicom.data.__file__).parent
CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "dicom-corpus"
STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."  # every Storage SOP class UID (PS3.4 B.5) starts so

SEG = ModelInfo("us-lesion-seg", "1", "segmentation", ("lesion",), True)
DET = ModelInfo("xray-nodule-det", "1", "detection", ("nodule",), True)
MODELS = {m.name: m for m in (SEG, DET)}
ROUTES = (
    DicomRoute(modality="US", model=SEG.name),
    DicomRoute(modality="CT", model=SEG.name),
    DicomRoute(modality="MR", model=SEG.name),
    DicomRoute(modality="CR", model=DET.name),
    DicomRoute(modality="DX", model=DET.name),
)
SERIAL = "CONFORMANCE-1"
MAX_FRAMES_PROCESSED = 3  # a cine runs with a frame stride that leaves at most this many frames

# dciodvfy warnings a result may have, each with its reason (also in docs/dicom.md):
ALLOWED_WARNINGS = RESULT_WARNINGS + (
    # Patient's Size / Weight 0 in the source (a device's "not entered"), copied as sent: a
    # valid DS, and results do not alter the Patient Study module of their study.
    ("Value is zero for value 1 of attribute <Patient's Size>", ""),
    ("Value is zero for value 1 of attribute <Patient's Weight>", ""),
    # Requesting Service (0032,1033) is in the General Study module (Type 3) of the current
    # standard (highdicom copies that module); dicom3tools 2022 does not know it there yet,
    # and then calls the object a Standard Extended SOP Class.
    ("Requesting Service", "not present in standard DICOM IOD"),
    ("Standard Extended SOP Class", ""),
    # Name of Physician(s) Reading Study "----" in the source: a valid PN, copied as sent.
    ("Retired Person Name form", ""),
    # A code in the source's Procedure Code Sequence with the device's own coding scheme
    # (SIEMENS_RIS), copied as sent.
    ("Unrecognized defined term", "Coding Scheme Designator"),
)

# Files the SCP refuses, with the status it answers and why (docs/dicom.md).
CANNOT_UNDERSTAND = 0xC210
REFUSED: dict[str, tuple[int, str]] = {
    "pydicom:JPEG2000-embedded-sequence-delimiter.dcm": (CANNOT_UNDERSTAND, "corrupt JPEG 2000 codestream header"),
    "pydicom:MR_truncated.dcm": (CANNOT_UNDERSTAND, "Pixel Data runs past the end of the data set"),
    "pydicom:SC_rgb_jpeg.dcm": (CANNOT_UNDERSTAND, "data set encoded in implicit VR under an explicit VR transfer syntax"),
    "pydicom:UN_sequence.dcm": (CANNOT_UNDERSTAND, "no SOP Class/Instance UID in the data set"),
    "pydicom:badVR.dcm": (CANNOT_UNDERSTAND, "Number of Frames is not a number ('1A')"),
    "pydicom:no_meta_group_length.dcm": (CANNOT_UNDERSTAND, "no SOP Class/Instance UID in the data set"),
    "pydicom:priv_SQ.dcm": (CANNOT_UNDERSTAND, "no SOP Class/Instance UID in the data set"),
    "pydicom:rtplan_truncated.dcm": (CANNOT_UNDERSTAND, "an element runs past the end of the data set"),
    "pydicom:chrSQEncoding.dcm": (CANNOT_UNDERSTAND, "no SOP Class/Instance UID in the data set"),
    "pydicom:chrSQEncoding1.dcm": (CANNOT_UNDERSTAND, "no SOP Class/Instance UID in the data set"),
}


@dataclass(frozen=True)
class CorpusFile:
    """One storage instance of the corpus and what the SCP does with it."""

    id: str  # "pydicom:<path>" or "corpus:<name>"
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    model: str | None  # the routed model, None when unrouted or refused
    refusal: str | None  # why the bounded scan refuses it, None when it is accepted
    has_pixels: bool
    modality: str


def _candidates() -> Iterator[tuple[str, Path]]:
    tests = PYDICOM_DATA / "test_files"
    for p in sorted(tests.rglob("*")):
        if p.is_file():
            yield f"pydicom:{p.relative_to(tests)}", p
    for p in sorted((PYDICOM_DATA / "charset_files").glob("*")):
        yield f"pydicom:{p.name}", p
    for p in sorted(CORPUS_DIR.glob("*.dcm")):
        yield f"corpus:{p.name}", p


def _classify() -> list[CorpusFile]:
    """Every Part 10 storage instance of the corpus; routing and refusal as the SCP decides them."""
    router = Router(ROUTES)
    out = []
    for name, path in _candidates():
        try:
            meta = read_file_meta_info(path)
            sop, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            continue  # not a DICOM Part 10 file (README, JSON, dumps, files without file meta)
        if not sop.startswith(STORAGE_ROOT) or not ts:
            continue  # a DICOMDIR (Media Storage Directory) or a file meta without a class: nothing to C-STORE
        raw = path.read_bytes()
        model, refusal, has_pixels, modality = None, None, False, ""
        try:
            _ts, offset = split_part10(raw)
            info = scan_encoded(memoryview(raw)[offset:], ts)
        except (DataError, SizeLimitError) as exc:
            refusal = str(exc)
        else:
            model = router.match(info)
            modality = info.modality
            has_pixels = "PixelData" in dcmread(path, stop_before_pixels=False, specific_tags=["PixelData"])
        out.append(CorpusFile(name, path, sop, ts, model, refusal, has_pixels, modality))
    return out


CORPUS = _classify()
ROUTED = [c for c in CORPUS if c.model and c.has_pixels]
# Routed image instances that hold no Pixel Data (pydicom's DICOMDIR test set keeps only the
# headers): refused with 0xC210 at C-STORE (nothing a model could run), never stored.
QUARANTINED = {c.id for c in CORPUS if c.model and not c.has_pixels}


def _synthetic(name: str, make: Callable[[], Dataset], model: ModelInfo) -> tuple[str, Callable[[], Dataset], ModelInfo]:
    return f"synthetic:{name}", make, model


# What no public file has (ultrasound without an image plane but with spacing / a frame of
# reference, DX), as vendors send it.
SYNTHETIC = [
    _synthetic("us_pixel_spacing", V.us_spacing, SEG),
    _synthetic("us_frame_of_reference", V.us_frame_of_reference, SEG),
    _synthetic("us_medge_demo", V.us_demo, SEG),
    _synthetic("us_regions", V.us_regions, SEG),
    _synthetic("us_cine_regions", V.us_cine_regions, SEG),
    _synthetic("dx", V.dx, DET),
    _synthetic("dx_pixel_spacing", V.dx_pixel_spacing, DET),
]


# --------------------------------------------------------------------------- helpers
def _dciodvfy(exe: str, path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) as dciodvfy reports them for ``path``."""
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def _saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _roi_refs(doc: hd.sr.ComprehensiveSR) -> list[tuple[str, list[int] | None]]:
    """(referenced SOP Instance UID, frame numbers or None) of each planar ROI of a TID 1500 SR."""
    out = []
    for group in doc.content.get_planar_roi_measurement_groups():
        ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        frames = ref.get("ReferencedFrameNumber")
        if frames is not None:
            frames = [int(x) for x in (frames if isinstance(frames, (list, MultiValue)) else [frames])]
        out.append((str(ref.ReferencedSOPInstanceUID), frames))
    return out


def _allowed(warning: str) -> bool:
    return any(a in warning and b in warning for a, b in ALLOWED_WARNINGS)


def _process(path: Path, model: ModelInfo) -> tuple[Dataset, list[int], list[np.ndarray], list[Dataset]]:
    """What the pipeline does with one spooled instance: (header, frame numbers, frames, result objects)."""
    limits = ScanLimits()
    ds = read_spooled(path, limits)
    n = min(number_of_frames(ds), limits.max_frames)
    stride = max(1, math.ceil(n / MAX_FRAMES_PROCESSED))
    indices = list(range(0, n, stride))
    images = [frame_to_array(ds, decode_frame(ds, i)) for i in indices]
    svc = f.FakeService()
    answers = [svc.infer(im, model=model.name, source="dicom") for im in images]
    assert all(a.status == "ok" for a in answers)
    masks = np.stack([np.asarray(a.mask, np.uint8) for a in answers]) if model.task == "segmentation" else None
    boxes = [[b.to_dict() for b in a.boxes] for a in answers]
    header = read_spooled(path, limits, stop_before_pixels=True)
    frames = [i + 1 for i in indices]
    src = SourceResult(header, frames, masks, boxes)
    objects = build_results([src], model, device_serial_number=SERIAL)
    objects += [
        make_overlay(header, images[k], src, k, model, device_serial_number=SERIAL, series=[src])
        for k in range(len(frames))
    ]
    return header, frames, images, objects


def _check_results(header: Dataset, frames: list[int], images: list[np.ndarray], objects: list[Dataset],
                   model: ModelInfo, tmp_path: Path) -> list[str]:
    """Read back and reference checks of every result object; returns dciodvfy's verdicts to check."""
    study, series, sop = str(header.StudyInstanceUID), str(header.SeriesInstanceUID), str(header.SOPInstanceUID)
    multiframe = number_of_frames(header) > 1
    expected = [f.FakeService.expected(im, model.name) for im in images]
    kinds = [str(o.Modality) for o in objects]
    main = "SR" if model.task == "detection" or multiframe else kinds[0]
    assert kinds[0] == main and kinds[1:] == ["OT"] * len(frames), kinds
    paths = []
    for n, obj in enumerate(objects):
        path = tmp_path / f"{n}_{obj.Modality}.dcm"
        obj.save_as(path, enforce_file_format=True)
        paths.append(path)
        assert obj.StudyInstanceUID == study and obj.SeriesInstanceUID != series
        assert obj.DeviceSerialNumber == SERIAL
        assert obj.PatientID == header.get("PatientID", "")  # the result files under the same patient
        if obj.Modality == "SEG":
            seg = hd.seg.segread(path)
            assert seg.get_source_image_uids() == [(study, series, sop)]
            ref = seg.ReferencedSeriesSequence[0]
            assert ref.SeriesInstanceUID == series and ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == sop
            px = seg.get_pixels_by_source_instance([sop], segment_numbers=[1], assert_missing_frames_are_empty=True)
            assert np.array_equal(px[0, ..., 0], expected[0])
        elif obj.Modality == "SR":
            doc = hd.sr.srread(path)
            evidence = doc.CurrentRequestedProcedureEvidenceSequence[0]
            assert evidence.StudyInstanceUID == study
            assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == series
            assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop
            rois = _roi_refs(doc)
            assert {uid for uid, _fr in rois} <= {sop}
            if model.task == "detection":
                want = frames  # one box per processed frame
            else:
                want = [fr for fr, m in zip(frames, expected) if mask_outlines(m, min_pixels=9)]
            if multiframe:
                assert sorted({fr[0] for _uid, fr in rois if fr}) == want
                assert all(fr is not None and len(fr) == 1 for _uid, fr in rois)
            else:
                assert all(fr is None for _uid, fr in rois) and bool(rois) == bool(want)
            if not rois:  # nothing found: a TID 1501 group says so, referencing the source
                text = str(doc.content)
                assert sop in text
        else:
            sc = hd.imread(path)
            assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
            item = sc.SourceImageSequence[0]
            assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (header.SOPClassUID, sop)
            assert item.get("ReferencedFrameNumber") == (frames[n - 1] if multiframe else None)
            assert sc.pixel_array.shape[:2] == (int(header.Rows), int(header.Columns))
    exe = require_peer("dciodvfy")  # last: without it the read-back and reference checks above still ran
    verdicts = []
    for path in paths:
        errors, warnings = _dciodvfy(exe, path)
        assert errors == [], f"dciodvfy errors on {path.name}: {errors}"
        for w in warnings:
            pywarnings.warn(f"dciodvfy {path.name}: {w}", DciodvfyWarning, stacklevel=2)
        unexplained = [w for w in warnings if not _allowed(w)]
        assert unexplained == [], f"dciodvfy warnings on {path.name} without a reason: {unexplained}"
        verdicts.append(f"{path.stem}: 0 errors, {len(warnings)} warnings")
    return verdicts


# --------------------------------------------------------------------------- the corpus itself
def test_corpus_covers_what_the_conformance_statement_claims() -> None:
    """The corpus holds each kind of input docs/dicom.md lists, and the refusals are the documented ones."""
    routed = {c.id: c for c in ROUTED}

    def has(pred: Callable[[Dataset, CorpusFile], bool]) -> list[str]:
        return [c.id for c in routed.values() if pred(dcmread(c.path, stop_before_pixels=True), c)]

    multi = lambda ds: int(ds.get("NumberOfFrames", 1) or 1) > 1  # noqa: E731
    assert has(lambda ds, c: c.modality == "US" and not multi(ds) and "PixelSpacing" not in ds)
    assert has(lambda ds, c: c.modality == "US" and multi(ds) and c.transfer_syntax_uid == "1.2.840.10008.1.2.4.50")
    assert has(lambda ds, c: c.modality == "US" and multi(ds) and c.transfer_syntax_uid == "1.2.840.10008.1.2.5")
    assert has(lambda ds, c: c.modality == "US" and ds.PhotometricInterpretation == "PALETTE COLOR")
    assert has(lambda ds, c: c.modality == "US" and "SequenceOfUltrasoundRegions" in ds)
    for modality in ("CR", "CT", "MR"):
        assert has(lambda ds, c, m=modality: c.modality == m), modality
    # Synthetic: US with Pixel Spacing / Frame of Reference but no image plane, and DX.
    made = {name: make() for name, make, _m in SYNTHETIC}
    assert "PixelSpacing" in made["synthetic:us_pixel_spacing"]
    assert "FrameOfReferenceUID" in made["synthetic:us_frame_of_reference"]
    assert made["synthetic:dx"].Modality == "DX"
    # Refused exactly as documented; the committed files are all there and small.
    assert {c.id for c in CORPUS if c.refusal} == set(REFUSED)
    committed = sorted(p.name for p in CORPUS_DIR.glob("*.dcm"))
    assert committed and all(f"corpus:{n}" in routed for n in committed)
    assert sum(p.stat().st_size for p in CORPUS_DIR.iterdir()) < 3_000_000
    readme = (CORPUS_DIR / "README.md").read_text()
    assert all(n in readme for n in committed)


# --------------------------------------------------------------------------- routed: results
@pytest.mark.parametrize("item", ROUTED, ids=lambda c: c.id)
def test_routed_file_gives_valid_results_that_reference_it(item: CorpusFile, tmp_path: Path) -> None:
    model = MODELS[item.model or ""]
    header, frames, images, objects = _process(item.path, model)
    for verdict in _check_results(header, frames, images, objects, model, tmp_path):
        print(verdict)


@pytest.mark.parametrize("name, make, model", SYNTHETIC, ids=[s[0] for s in SYNTHETIC])
def test_synthetic_input_gives_valid_results_that_reference_it(
    name: str, make: Callable[[], Dataset], model: ModelInfo, tmp_path: Path
) -> None:
    path = f.save(make(), tmp_path / "source.dcm")
    header, frames, images, objects = _process(path, model)
    out = tmp_path / "results"
    out.mkdir()
    _check_results(header, frames, images, objects, model, out)


# --------------------------------------------------------------------------- every file: the SCP
@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DicomIngest, f.FakeService, CollectorRegistry]]:
    cfg = f.dicom_config(
        tmp_path_factory.mktemp("scp"),
        routes=ROUTES,
        unrouted="accept",
        series_idle_s=0.05,
        frame_stride=10,  # a 30-frame cine runs 3 frames: the test is about acceptance, not throughput
        secondary_capture=True,
        allowed_calling_aes=("PYSCU",),
    )
    svc, reg = f.FakeService(), CollectorRegistry()
    ing = DicomIngest(cfg, svc, reg, cfg.spool_dir, model_info=MODELS.__getitem__).start()
    try:
        yield ing, svc, reg
    finally:
        ing.close()


def _store(port: int, item: CorpusFile) -> int:
    """C-STORE one file as stored (no decode); asserts its presentation context is accepted."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(item.sop_class_uid, item.transfer_syntax_uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGE")
    assert assoc.is_established, "association refused"
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid]
        assert accepted, f"no presentation context for SOP class {item.sop_class_uid} / {item.transfer_syntax_uid}"
        return int(assoc.send_c_store(item.path).Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def _results(reg: CollectorRegistry) -> float:
    return sum(_value(reg, "medge_dicom_results_total", kind=k) for k in ("SEG", "SR", "OT"))


@pytest.mark.parametrize("item", CORPUS, ids=lambda c: c.id)
def test_scp_accepts_every_storage_file_and_answers_as_documented(scp, item: CorpusFile) -> None:
    ing, svc, reg = scp
    assert ing.pipeline is not None
    calls, results = len(svc.calls), _results(reg)
    decode_failures = _value(reg, "medge_dicom_processing_failures_total", reason="decode")
    unrouted = _value(reg, "medge_dicom_unrouted_total", sop_class_uid=item.sop_class_uid, action="accept")
    status = _store(ing.port, item)
    if item.id in QUARANTINED:  # routed, but nothing a model could run: refused, nothing stored
        assert status == CANNOT_UNDERSTAND, f"0x{status:04X}"
        assert ing.spool.pending_instances() == [] and len(svc.calls) == calls
        assert not list(ing.spool.failed_dir.glob("*"))
        return
    if item.id in REFUSED:
        assert item.refusal is not None
        assert status == REFUSED[item.id][0], f"0x{status:04X}"
        assert ing.spool.pending_instances() == []
        return
    assert item.refusal is None, item.refusal
    assert status == 0x0000, f"0x{status:04X}"
    if item.model is None:  # accepted and dropped: counted by SOP class, never stored or run
        assert _value(reg, "medge_dicom_unrouted_total", sop_class_uid=item.sop_class_uid, action="accept") == unrouted + 1
        assert ing.spool.pending_instances() == [] and len(svc.calls) == calls
        return
    assert ing.pipeline.wait_idle(30), "the pipeline did not finish"
    assert ing.spool.pending_instances() == []
    assert len(svc.calls) > calls and all(c[0] == item.model for c in svc.calls[calls:])
    assert _value(reg, "medge_dicom_processing_failures_total", reason="decode") == decode_failures
    assert _results(reg) >= results + 2  # a SEG or an SR, and at least one overlay


# --------------------------------------------------------------------------- defects the corpus found
def _disc_mask(ds: Dataset) -> np.ndarray:
    yy, xx = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
    return (((xx - 20) ** 2 + (yy - 20) ** 2) < 100).astype(np.uint8)


@pytest.mark.parametrize("slices", [1, 2])
def test_frame_of_reference_uid_equal_to_the_study_uid_gives_an_sr_not_a_seg_in_it(slices: int, tmp_path: Path) -> None:
    # pydicom's dicomdirtests MR files: Frame of Reference UID = Study Instance UID. A SEG in
    # that frame of reference repeated the clash (dciodvfy error "StudyInstanceUID has same
    # value as FrameOfReferenceUID"); the outlines now go into an SR, as for incomplete geometry.
    series = V.make_mr_series(slices)
    for ds in series:
        ds.FrameOfReferenceUID = ds.StudyInstanceUID
    sources = [SourceResult(V.received(ds), [1], _disc_mask(ds)[None]) for ds in series]
    (result,) = build_results(sources, SEG)
    assert result.Modality == "SR"
    errors, warnings = _dciodvfy(require_peer("dciodvfy"), _saved(result, tmp_path / "sr.dcm"))
    assert errors == [] and warnings == []
    refs = _roi_refs(hd.sr.srread(tmp_path / "sr.dcm"))
    assert {uid for uid, _fr in refs} == {str(s.dataset.SOPInstanceUID) for s in sources}
    # Control: the same series with its own Frame of Reference UID gets its SEG in that frame.
    good = V.make_mr_series(slices)
    (seg,) = build_results([SourceResult(V.received(ds), [1], _disc_mask(ds)[None]) for ds in good], SEG)
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == good[0].FrameOfReferenceUID


@pytest.mark.parametrize("method", [None, "DICOM PS3.15 Basic Profile"])
def test_patient_identity_removed_without_a_method_is_not_claimed(method: str | None, tmp_path: Path) -> None:
    # pydicom's 693_J2KI.dcm: Patient Identity Removed YES, no De-identification Method (Type
    # 1C). The SR copied the claim and dciodvfy reported two errors; now the claim is dropped,
    # and kept where the source names its method.
    ds = V.us_plain()
    ds.PatientIdentityRemoved = "YES"
    if method:
        ds.DeidentificationMethod = method
    src = V.received(ds)
    box = {"label": "nodule", "score": 0.9, "x0": 2, "y0": 2, "x1": 9, "y1": 9}
    (seg,) = build_results([SourceResult(src, [1], _disc_mask(src)[None])], SEG)
    (sr,) = build_results([SourceResult(src, [1], None, [[box]])], DET)
    exe = require_peer("dciodvfy")
    for obj in (seg, sr):
        assert ("PatientIdentityRemoved" in obj) == bool(method)
        assert obj.get("DeidentificationMethod") == method
        errors, _warnings = _dciodvfy(exe, _saved(obj, tmp_path / f"{obj.Modality}.dcm"))
        assert errors == [], errors
