"""Result objects (SEG, TID 1500 SR, SC overlay): dciodvfy-clean, and they read back to what went in."""

from __future__ import annotations

import io
import re
import warnings as pywarnings
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from edge.egress.dicom.common import ModelInfo, SourceResult, default_device_serial, series_description
from edge.egress.dicom.results import build_results
from edge.egress.dicom.sc import make_overlay
from tests.conftest import PEERS, require_peer
from tests.edge import dicom_factory as f
from tests.edge import test_dicom_results_vendors as V


class DciodvfyWarning(UserWarning):
    """A dciodvfy warning on a result object (errors fail the test)."""

SEG = ModelInfo("us-lesion-seg", "1.0", "segmentation", ("lesion",), True)
DET = ModelInfo("xray-nodule-det", "1.0", "detection", ("nodule",), True)


def roundtrip(ds: Dataset, stop_before_pixels: bool = True) -> Dataset:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf, stop_before_pixels=stop_before_pixels)


def dciodvfy(ds: Dataset, tmp_path: Path, name: str) -> list[str]:
    """Run dciodvfy; assert no errors; return (and print) its warnings."""
    exe = require_peer("dciodvfy")
    p = tmp_path / f"{name}.dcm"
    ds.save_as(p, enforce_file_format=True)
    out = subprocess.run([exe, str(p)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    print(f"dciodvfy {name}: {len(errors)} errors, {len(warnings)} warnings")
    for w in warnings:
        print(f"  {w}")
        # Also in pytest's warnings summary, so CI output lists them without -s.
        pywarnings.warn(f"dciodvfy {name.split('.')[0]}: {w}", DciodvfyWarning, stacklevel=2)
    assert errors == [], f"dciodvfy errors on {name}: {errors}"
    return warnings


def disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(np.uint8)


def test_ct_series_gives_one_seg_that_reads_back(tmp_path: Path) -> None:
    series = [roundtrip(d) for d in f.make_ct_series(4, 64)]
    masks = [disc(64, 64, 20 + 5 * i, 30, 6 + i) for i in range(4)]
    masks[2][:] = 0  # an empty slice is still a frame
    (seg,) = build_results([SourceResult(d, [1], m[None]) for d, m in zip(series, masks)], SEG)
    dciodvfy(seg, tmp_path, "ct_seg")
    assert seg.SeriesDescription == "us-lesion-seg SEG NOT FOR CLINICAL USE"
    assert seg.StudyInstanceUID == series[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != series[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    back = hd.seg.Segmentation.from_dataset(roundtrip(seg, stop_before_pixels=False))
    assert back.SegmentationType == "BINARY" and back.get_segment_numbers() == [1]
    uids = [str(d.SOPInstanceUID) for d in series]
    pixels = back.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels[..., 0], np.stack(masks))
    # Same inputs, same UIDs (re-processing after a crash is a resend, not a duplicate).
    (again,) = build_results([SourceResult(d, [1], m[None]) for d, m in zip(series, masks)], SEG)
    assert again.SOPInstanceUID == seg.SOPInstanceUID


def test_single_frame_us_without_frame_of_reference_gives_a_seg(tmp_path: Path) -> None:
    img = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) % 251).astype(np.uint8)
    src = roundtrip(f.make_us_single(img))
    mask = disc(48, 64, 30, 20, 9)
    (seg,) = build_results([SourceResult(src, [1], mask[None])], SEG)
    dciodvfy(seg, tmp_path, "us_seg")
    back = hd.seg.Segmentation.from_dataset(roundtrip(seg, stop_before_pixels=False))
    px = back.get_pixels_by_source_instance([str(src.SOPInstanceUID)], segment_numbers=[1])
    assert np.array_equal(px[0, ..., 0], mask)


def _rois(sr: Dataset) -> list[tuple[str, list[int] | None, np.ndarray, float | None]]:
    """(referenced SOP instance, frame numbers, polyline, certainty %) per planar ROI of a TID 1500 SR."""
    doc = hd.sr.ComprehensiveSR.from_dataset(sr)
    out = []
    for group in doc.content.get_planar_roi_measurement_groups():
        region = group.roi
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        frames = None
        if "ReferencedFrameNumber" in ref:
            v = ref.ReferencedFrameNumber
            frames = [int(x) for x in (v if isinstance(v, MultiValue) else [v])]
        score = None
        for m in group.get_measurements(name=codes.DCM.CertaintyOfFinding):
            score = float(m.value)
        out.append((str(ref.ReferencedSOPInstanceUID), frames, np.asarray(region.value), score))
    return out


@pytest.mark.parametrize("maker", [f.make_cr, f.make_dx])
def test_detection_sr_has_one_closed_polyline_roi_per_box(maker, tmp_path: Path) -> None:
    img = np.full((256, 256), 900, np.uint16)
    src = roundtrip(maker(img))
    boxes = [
        {"label": "nodule", "score": 0.91, "x0": 10.5, "y0": 20.0, "x1": 50.0, "y1": 70.25},
        {"label": "nodule", "score": 0.55, "x0": 100.0, "y0": 120.0, "x1": 140.0, "y1": 150.0},
    ]
    (sr,) = build_results([SourceResult(src, [1], None, [boxes])], DET)
    dciodvfy(sr, tmp_path, f"{src.Modality.lower()}_sr")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    rois = _rois(roundtrip(sr, stop_before_pixels=False))
    assert len(rois) == 2
    for (uid, frames, poly, score), box in zip(rois, boxes):
        assert uid == src.SOPInstanceUID and frames is None
        assert np.array_equal(poly[0], poly[-1]) and len(poly) == 5  # closed rectangle
        assert np.allclose([poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max()],
                           [box["x0"], box["y0"], box["x1"], box["y1"]], atol=1e-3)
        assert score == pytest.approx(100 * box["score"], abs=0.01)


def test_detection_sr_with_nothing_found_is_still_valid(tmp_path: Path) -> None:
    src = roundtrip(f.make_dx(np.full((64, 64), 5, np.uint16)))
    (sr,) = build_results([SourceResult(src, [1], None, [[]])], DET)
    dciodvfy(sr, tmp_path, "dx_sr_empty")
    assert _rois(roundtrip(sr, stop_before_pixels=False)) == []


def test_cine_segmentation_gives_per_frame_outline_rois(tmp_path: Path) -> None:
    frames = np.zeros((6, 60, 80), np.uint8)
    src = roundtrip(f.make_us_multiframe(frames))
    processed = [1, 3, 5]  # frame stride 2
    masks = np.stack([disc(60, 80, 20 + 10 * i, 30, 8) for i in range(3)])
    masks[1] |= disc(60, 80, 70, 50, 5)  # a second region on frame 3
    results = build_results([SourceResult(src, processed, masks, [[], [], []])], SEG)
    assert [r.Modality for r in results] == ["SR"]  # highdicom cannot SEG a cine without a frame of reference
    dciodvfy(results[0], tmp_path, "us_cine_sr")
    rois = _rois(roundtrip(results[0], stop_before_pixels=False))
    by_frame: dict[int, list[np.ndarray]] = {}
    for uid, fr, poly, _score in rois:
        assert uid == src.SOPInstanceUID and fr is not None and len(fr) == 1
        by_frame.setdefault(fr[0], []).append(poly)
    assert sorted(by_frame) == processed and len(by_frame[3]) == 2
    yy, xx = np.mgrid[0:60, 0:80]
    from tests.edge.test_dicom_units import _inside

    for i, fr in enumerate(processed):
        cover = np.zeros((60, 80), bool)
        for poly in by_frame[fr]:
            cover |= _inside(poly, xx + 0.5, yy + 0.5)
        assert np.array_equal(cover, masks[i] > 0)


def test_secondary_capture_overlay_is_valid(tmp_path: Path) -> None:
    img = (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)
    src = roundtrip(f.make_cr(img))
    res = SourceResult(src, [1], None, [[{"label": "nodule", "score": 0.9, "x0": 5, "y0": 5, "x1": 20, "y1": 30}]])
    sc = make_overlay(src, img.astype(np.float32), res, 0, DET)
    assert dciodvfy(sc, tmp_path, "overlay_sc") == []
    px = roundtrip(sc, stop_before_pixels=False).pixel_array
    assert px.shape == (64, 64, 3) and tuple(px[5, 10]) == (0, 255, 0)


def only_unknown_laterality(warnings: list[str]) -> bool:
    """The one dciodvfy warning an empty (side unknown) Laterality gets, and nothing else."""
    return len(warnings) == 1 and "<Laterality>" in warnings[0] and "empty when actually unknown" in warnings[0]


@pytest.mark.parametrize(
    "body_part, laterality, expected",
    [
        # Unpaired body part: Laterality (General Series, Type 2C) absent, even if the source set one.
        ("ABDOMEN", None, None),
        ("ABDOMEN", "R", None),
        # Paired body part of known side: the side, through highdicom's ``laterality``.
        ("BREAST", "L", "L"),
        # A paired body part of unknown side, or no Body Part Examined at all (the factory's plain US):
        # dciodvfy cannot rule out a paired structure, so leaving Laterality out is an *error*
        # ("Missing attribute Type 2C"), and a value or a body part would be invented data. Empty is
        # the standard's "unknown"; dciodvfy still warns that empty is only for "actually unknown",
        # which it is. Unavoidable without data the modality did not send.
        ("BREAST", None, ""),
        (None, None, ""),
    ],
)
def test_us_overlay_laterality_follows_the_source(
    tmp_path: Path, body_part: str | None, laterality: str | None, expected: str | None
) -> None:
    img = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    src = roundtrip(f.make_us_single(img))
    if body_part:
        src.BodyPartExamined = body_part
    if laterality:
        src.Laterality = laterality
    mask = disc(48, 64, 30, 20, 9)
    sc = make_overlay(src, img.astype(np.float32), SourceResult(src, [1], mask[None]), 0, SEG)
    warnings = dciodvfy(sc, tmp_path, "us_overlay_sc")
    if expected == "":
        assert only_unknown_laterality(warnings), warnings
    else:
        assert warnings == []
    back = roundtrip(sc)
    assert back.get("Laterality") == expected
    assert back.get("BodyPartExamined") == body_part


def test_cine_overlay_without_anatomy_has_only_the_unknown_laterality_warning(tmp_path: Path) -> None:
    frames = np.stack([np.full((40, 56), 20 * i, np.uint8) for i in range(3)])
    src = roundtrip(f.make_us_multiframe(frames))
    masks = np.stack([disc(40, 56, 20, 20, 6)] * 2)
    sc = make_overlay(src, frames[2].astype(np.float32), SourceResult(src, [1, 3], masks), 1, SEG)
    assert sc.InstanceNumber == 10003  # 10000 x the source's Instance Number (1) + frame 3
    # See test_us_overlay_laterality_follows_the_source: no body part, no side -> empty, one warning.
    assert only_unknown_laterality(dciodvfy(sc, tmp_path, "us_cine_overlay_sc"))


def test_series_description_fits_and_flags_research_models() -> None:
    long = ModelInfo("m" * 70, "1", "segmentation")
    assert len(series_description(long, "SEG")) <= 64
    assert series_description(long, "SEG").endswith("NOT FOR CLINICAL USE")
    assert "CLINICAL" not in series_description(ModelInfo("x", "1", "detection", research_only=False), "SR")


def test_tools_present() -> None:
    # Every real peer the suite drives (`make peers` installs them): one skip naming all that are
    # missing on a machine where they could not be installed, a failure under CI=true.
    assert require_peer(*sorted(PEERS))


# --------------------------------------------------------------------------- "DICOM you can trust"
# dciodvfy warnings a result may keep, each with its reason (docs/dicom.md, "Validation"):
ALLOWED_WARNINGS = (
    # SC overlay of a source naming neither a body part nor its side: Laterality (Type 2C) empty
    # = unknown; leaving it out is a dciodvfy *error*, a value would be invented.
    ("<Laterality>", "empty when actually unknown"),
    # A source without Study Date / Time / ID (Type 2, empty in the source): the result copies
    # the study's values, and inventing them would split the study in the PACS.
    ("needed to build DICOMDIR", ""),
)


def allowed(warnings: list[str]) -> bool:
    return all(any(a in w and b in w for a, b in ALLOWED_WARNINGS) for w in warnings)


def _content_items(ds: Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _sr_texts(sr: Dataset) -> list[str]:
    return [str(i.TextValue) for i in _content_items(sr) if i.get("ValueType") == "TEXT"]


def _observer_uid(sr: Dataset) -> str:
    (uid,) = [str(i.UID) for i in _content_items(sr) if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    return uid


def _frame_pixels(full: Dataset, frame: int) -> np.ndarray:
    px = full.pixel_array
    return (px[frame - 1] if int(full.get("NumberOfFrames", 1) or 1) > 1 else px).astype(np.float32)


@pytest.mark.parametrize("variant", V.VARIANTS, ids=lambda v: v.name)
def test_every_modality_gives_results_that_pass_dciodvfy_and_read_back(variant: V.Variant, tmp_path: Path) -> None:
    full = variant.make()
    src = V.received(full)
    rows, cols = int(src.Rows), int(src.Columns)
    multi = int(src.get("NumberOfFrames", 1) or 1) > 1
    frames = [1, 3] if multi else [1]
    masks = np.stack([disc(rows, cols, cols / 2 + 4 * i, rows / 2, min(rows, cols) / 4) for i in range(len(frames))])
    boxes = [[{"label": "nodule", "score": 0.8, "x0": 4, "y0": 5, "x1": 20, "y1": 25}] for _ in frames]
    (seg_result,) = build_results([SourceResult(src, frames, masks)], SEG, device_serial_number="EDGE-7")
    assert seg_result.Modality == variant.seg_kind
    (det_result,) = build_results([SourceResult(src, frames, None, boxes)], DET, device_serial_number="EDGE-7")
    overlays = [
        make_overlay(
            src, _frame_pixels(full, fr), SourceResult(src, frames, masks, boxes), i, SEG, device_serial_number="EDGE-7"
        )
        for i, fr in enumerate(frames)
    ]
    study, series, sop = str(src.StudyInstanceUID), str(src.SeriesInstanceUID), str(src.SOPInstanceUID)
    for n, obj in enumerate([seg_result, det_result, *overlays]):
        name = f"{variant.name}_{n}_{obj.Modality}"
        warnings = dciodvfy(obj, tmp_path, name)
        assert allowed(warnings), warnings
        assert obj.Modality == "OT" or not warnings  # SEG and SR: no warning at all
        path = tmp_path / f"{name}.dcm"
        assert obj.StudyInstanceUID == study and obj.SeriesInstanceUID != series
        assert obj.DeviceSerialNumber == "EDGE-7"
        if obj.Modality == "SEG":
            back = hd.seg.segread(path)
            assert back.get_source_image_uids() == [(study, series, sop)]
            px = back.get_pixels_by_source_instance([sop], segment_numbers=[1])
            assert np.array_equal(px[0, ..., 0], masks[0])
            assert ("FrameOfReferenceUID" in back) == variant.seg_in_frame_of_reference
            if not variant.seg_in_frame_of_reference:
                # Aligned pixel for pixel with the source: no pixel measures it cannot complete.
                assert "PixelMeasuresSequence" not in back.SharedFunctionalGroupsSequence[0]
                assert "PatientOrientation" in back  # General Image, Type 2C
        elif obj.Modality == "SR":
            doc = hd.sr.srread(path)
            evidence = doc.CurrentRequestedProcedureEvidenceSequence[0]
            assert evidence.StudyInstanceUID == study
            assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == series
            assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop
            rois = _rois(doc)
            assert rois and {uid for uid, *_ in rois} == {sop}
            assert sorted({fr[0] for _, fr, *_ in rois}) == frames if multi else all(fr is None for _, fr, *_ in rois)
        else:
            back = hd.imread(path)
            assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
            ref = back.SourceImageSequence[0]
            assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, sop)
            assert ref.get("ReferencedFrameNumber") == (frames[n - 2] if multi else None)


@pytest.mark.parametrize("make", [V.us_demo, V.us_spacing, V.us_frame_of_reference, V.us_regions])
def test_defect1_ultrasound_seg_without_image_plane_is_valid_and_reads_back(make, tmp_path: Path) -> None:
    # An ultrasound image with a Frame of Reference UID and/or Pixel Spacing but no Image
    # Position/Orientation (medge's own demo data among them) used to give a SEG with a Frame of
    # Reference and a Pixel Measures Sequence without Slice Thickness: dciodvfy errors (Patient
    # Orientation Type 2C, Slice Thickness Type 1C) and highdicom could not read it back.
    src = V.received(make())
    mask = disc(int(src.Rows), int(src.Columns), 30, 20, 9)
    (seg,) = build_results([SourceResult(src, [1], mask[None])], SEG)
    assert dciodvfy(seg, tmp_path, "us_seg_no_plane") == []
    back = hd.seg.segread(tmp_path / "us_seg_no_plane.dcm")
    assert "FrameOfReferenceUID" not in back and back.PatientOrientation == ""
    assert "PixelMeasuresSequence" not in back.SharedFunctionalGroupsSequence[0]
    px = back.get_pixels_by_source_instance([str(src.SOPInstanceUID)], segment_numbers=[1])
    assert np.array_equal(px[0, ..., 0], mask)


def test_defect6_results_are_traceable_and_ordered(tmp_path: Path) -> None:
    serial = "EDGE-0042"
    # CT series: overlays reference their source and are numbered like their sources.
    ct = [V.received(d) for d in f.make_ct_series(3, 32)]
    fulls = f.make_ct_series(3, 32)
    masks = [disc(32, 32, 16, 16, 5)[None] for _ in ct]
    sources = [SourceResult(d, [1], m) for d, m in zip(ct, masks)]
    overlays = [
        make_overlay(d, fulls[i].pixel_array.astype(np.float32), s, 0, SEG, device_serial_number=serial, series=sources)
        for i, (d, s) in enumerate(zip(ct, sources))
    ]
    numbers = [int(o.InstanceNumber) for o in overlays]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    for o, d in zip(overlays, ct):
        ref = o.SourceImageSequence[0]
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (d.SOPClassUID, d.SOPInstanceUID)
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert o.DeviceSerialNumber == serial
    assert allowed(dciodvfy(overlays[0], tmp_path, "ct_overlay"))
    (seg,) = build_results(sources, SEG, device_serial_number=serial)
    assert seg.DeviceSerialNumber == serial
    # Per-instance SEGs of ultrasound images: distinct Instance Numbers, in the sources' order,
    # also when the modality numbered every image 1 (then by rank).
    for instance_numbers in ([3, 1, 2], [1, 1, 1]):
        us = []
        for n in instance_numbers:
            d = V.us_plain()
            d.InstanceNumber = n
            us.append(V.received(d))
        us_sources = [SourceResult(d, [1], disc(48, 64, 30, 20, 9)[None]) for d in us]
        segs = build_results(us_sources, SEG, device_serial_number=serial)
        got = sorted(int(s.InstanceNumber) for s in segs)
        assert got == ([1, 2, 3])
        if instance_numbers == [3, 1, 2]:
            refs = [s.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] for s in segs]
            by_source = {r.ReferencedSOPInstanceUID: int(s.InstanceNumber) for r, s in zip(refs, segs)}
            assert [by_source[d.SOPInstanceUID] for d in us] == instance_numbers
        ovl = [
            make_overlay(d, np.zeros((48, 64), np.float32), s, 0, SEG, series=us_sources)
            for d, s in zip(us, us_sources)
        ]
        assert len({int(o.InstanceNumber) for o in ovl}) == 3
    # Cine overlays: one per processed frame, distinct.
    cine = V.received(V.us_cine())
    cine_res = SourceResult(cine, [1, 3], np.stack([disc(40, 56, 20, 20, 6)] * 2))
    cine_numbers = [make_overlay(cine, np.zeros((40, 56), np.float32), cine_res, i, SEG).InstanceNumber for i in (0, 1)]
    assert [int(n) for n in cine_numbers] == [10001, 10003]
    # SR observer device: its UID follows the appliance and the model; the serial is in the SR.
    dx = V.received(V.dx())
    det = SourceResult(dx, [1], None, [[{"label": "nodule", "score": 0.9, "x0": 1, "y0": 1, "x1": 9, "y1": 9}]])
    (a,) = build_results([det], DET, device_serial_number="EDGE-A")
    (b,) = build_results([det], DET, device_serial_number="EDGE-B")
    (c,) = build_results([det], ModelInfo("other-det", "1.0", "detection", ("nodule",)), device_serial_number="EDGE-A")
    assert a.DeviceSerialNumber == "EDGE-A" and b.DeviceSerialNumber == "EDGE-B"
    assert len({_observer_uid(a), _observer_uid(b), _observer_uid(c)}) == 3
    assert "EDGE-A" in [str(i.get("TextValue", "")) for i in _content_items(a)]  # Device Observer Serial Number
    # Default: stable per machine, derived (hashed) from the machine id, never "0" or the raw id.
    (d1,) = build_results([det], DET)
    (d2,) = build_results([det], DET)
    assert d1.DeviceSerialNumber == d2.DeviceSerialNumber == default_device_serial()
    assert re.fullmatch(r"[0-9A-F]{16}", d1.DeviceSerialNumber)
    machine_id = Path("/etc/machine-id")
    if machine_id.exists() and machine_id.read_text().strip():
        assert machine_id.read_text().strip().upper()[:16] != d1.DeviceSerialNumber
    assert _observer_uid(d1) == _observer_uid(d2)


@pytest.mark.parametrize("research_only", [True, False])
def test_defect7_research_statement_in_seg_content_description_sr_text_and_sc_comments(
    research_only: bool, tmp_path: Path
) -> None:
    seg_model = ModelInfo("us-lesion-seg", "1.0", "segmentation", ("lesion",), research_only)
    det_model = ModelInfo("us-lesion-det", "1.0", "detection", ("lesion",), research_only)
    src = V.received(V.us_regions())
    mask = disc(48, 64, 30, 20, 9)
    (seg,) = build_results([SourceResult(src, [1], mask[None])], seg_model)
    box = {"label": "lesion", "score": 0.7, "x0": 2, "y0": 2, "x1": 9, "y1": 9}
    (sr,) = build_results([SourceResult(src, [1], None, [[box]])], det_model)
    sc = make_overlay(src, np.zeros((48, 64), np.float32), SourceResult(src, [1], mask[None]), 0, seg_model)
    for obj, name in ((seg, "seg"), (sr, "sr"), (sc, "sc")):
        assert dciodvfy(obj, tmp_path, f"research_{name}") == []
    texts = _sr_texts(hd.sr.srread(tmp_path / "research_sr.dcm"))
    assert _rois(hd.sr.srread(tmp_path / "research_sr.dcm"))  # the TID 1500 content still reads
    flagged = [
        "NOT FOR CLINICAL USE" in str(seg.get("ContentDescription", "")),
        any("NOT FOR CLINICAL USE" in t for t in texts),
        "NOT FOR CLINICAL USE" in str(sc.get("ImageComments", "")),
        all("NOT FOR CLINICAL USE" in str(o.SeriesDescription) for o in (seg, sr, sc)),
    ]
    assert flagged == [research_only] * 4


def _malformed_us(case: str) -> Dataset:
    d = V.us_plain()
    d.BodyPartExamined = "ABDOMEN"  # an unpaired body part: no Laterality warning on the SC
    if case == "birth_date":
        V.put_raw(d, "PatientBirthDate", b"1941-11-11x")
    elif case == "impossible_date":
        V.put_raw(d, "PatientBirthDate", b"19410231")
    elif case == "study_date":
        V.put_raw(d, "StudyDate", b"1941-11-11x")
    elif case == "study_time":
        V.put_raw(d, "StudyTime", b"25:99x")
    elif case == "uid_in_study_module":
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        V.put_raw(item, "ReferencedSOPInstanceUID", b"1.2.abc.3")
        d.ReferencedStudySequence = [item]
    elif case == "one_component_name":
        V.put_raw(d, "PatientName", b"DOE")
    elif case == "patient_sex":
        V.put_raw(d, "PatientSex", b"male")
    elif case == "long_decimal":
        V.put_raw(d, "PatientWeight", b"70.1234567890123456789", "DS")
    elif case == "charset":
        V.put_raw(d, "SpecificCharacterSet", b"ISO_IR 999")
    elif case == "two_patient_ids":  # defect 8: Patient ID is VM 1
        V.put_raw(d, "PatientID", b"PID8675309\\PID2")
    elif case == "other_id_without_type":  # defect 8: Type of Patient ID is Type 1 in the item
        item = Dataset()
        item.PatientID = "PID8675310"
        d.OtherPatientIDsSequence = [item]
    return V.received(d)


MALFORMED = {
    # case: (marker that must not reach a warning or log record, attribute, value in the results)
    "birth_date": ("1941-11-11x", "PatientBirthDate", ""),
    "impossible_date": ("19410231", "PatientBirthDate", ""),
    "study_date": ("1941-11-11x", "StudyDate", ""),
    "study_time": ("25:99x", "StudyTime", ""),
    "uid_in_study_module": ("1.2.abc.3", "ReferencedStudySequence", None),
    "one_component_name": ("DOE", "PatientName", "DOE^"),
    "patient_sex": ("male", "PatientSex", ""),
    "long_decimal": ("70.1234567890123456789", "PatientWeight", "70.1234567890124"),
    "charset": ("ISO_IR 999", "SpecificCharacterSet", "ISO_IR 192"),
    "two_patient_ids": ("PID8675309", "PatientID", ""),
    "other_id_without_type": ("PID8675310", "OtherPatientIDsSequence", None),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_defect10_malformed_source_values_are_repaired_and_do_not_leak(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker, keyword, expected = MALFORMED[case]
    src = _malformed_us(case)
    mask = disc(48, 64, 30, 20, 9)
    box = [[{"label": "lesion", "score": 0.7, "x0": 2, "y0": 2, "x1": 9, "y1": 9}]]
    caplog.set_level("DEBUG")
    caplog.clear()  # what writing the malformed source said is not ours
    with pywarnings.catch_warnings(record=True) as caught:  # a test may; the module must not
        pywarnings.simplefilter("always")
        (seg,) = build_results([SourceResult(src, [1], mask[None])], SEG)
        (sr,) = build_results([SourceResult(src, [1], None, box)], DET)
        sc = make_overlay(src, np.zeros((48, 64), np.float32), SourceResult(src, [1], mask[None]), 0, SEG)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if marker in s], said
    for obj, name in ((seg, "seg"), (sr, "sr"), (sc, "sc")):
        warnings = dciodvfy(obj, tmp_path, f"{case}_{name}")
        assert allowed(warnings) and all("DICOMDIR" in w for w in warnings), warnings  # study date/time: empty
        back = roundtrip(obj)
        value = back.get(keyword)
        if not (obj.Modality == "OT" and keyword == "PatientWeight"):  # highdicom's SC copies no Patient Study
            assert (None if value is None else str(value)) == expected
        # The result still references its source by its UIDs.
        assert back.StudyInstanceUID == src.StudyInstanceUID
    assert hd.seg.segread(tmp_path / f"{case}_seg.dcm").get_source_image_uids()[0][2] == src.SOPInstanceUID
    assert _rois(hd.sr.srread(tmp_path / f"{case}_sr.dcm"))[0][0] == src.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_defect10_missing_type2_source_attributes_still_give_valid_results(tmp_path: Path) -> None:
    d = V.us_plain()
    d.BodyPartExamined = "ABDOMEN"
    missing = (
        "PatientSex", "StudyID", "ReferringPhysicianName", "AccessionNumber", "StudyDate", "StudyTime", "PatientBirthDate"
    )
    for keyword in missing:
        delattr(d, keyword)
    src = V.received(d)
    mask = disc(48, 64, 30, 20, 9)
    (seg,) = build_results([SourceResult(src, [1], mask[None])], SEG)
    (sr,) = build_results([SourceResult(src, [1], None, [[]])], DET)
    sc = make_overlay(src, np.zeros((48, 64), np.float32), SourceResult(src, [1], mask[None]), 0, SEG)
    for obj, name in ((seg, "seg"), (sr, "sr"), (sc, "sc")):
        warnings = dciodvfy(obj, tmp_path, f"type2_{name}")
        assert allowed(warnings) and all("DICOMDIR" in w for w in warnings), warnings
        back = roundtrip(obj)
        for keyword in missing:
            assert keyword in back and back[keyword].value in ("", None), keyword  # Type 2: present, empty


def test_configured_device_serial_number_reaches_results_through_the_pipeline(tmp_path: Path) -> None:
    """``[dicom] device_serial_number`` from the config is what the pipeline writes into its results."""
    from edge.config import load_config
    from edge.ingest.dicom.scp import DicomIngest
    from prometheus_client import CollectorRegistry

    cfg = load_config(None, env={"MEDGE_DICOM__DEVICE_SERIAL_NUMBER": "MEDGE-SN-0042"}, check_models=False)

    class _Svc:
        def models(self):  # type: ignore[no-untyped-def]
            return ("us-lesion-seg",)

    ingest = DicomIngest(cfg, _Svc(), CollectorRegistry(), tmp_path)  # type: ignore[arg-type]
    try:
        assert ingest.pipeline is not None and ingest.pipeline.device_serial_number == "MEDGE-SN-0042"
    finally:
        ingest.close()


def _with_charset_of(name: str) -> tuple[Dataset, Dataset]:
    """A US image carrying, byte for byte, the Specific Character Set and names of pydicom's test file ``name``."""
    from pydicom.data import get_charset_files
    from pydicom.tag import Tag

    (path,) = get_charset_files(name)
    charset_file = dcmread(path)
    d = V.us_plain()
    d.BodyPartExamined = "ABDOMEN"
    for keyword in ("SpecificCharacterSet", "PatientName"):
        raw = charset_file.get_item(keyword)
        d._dict[Tag(raw.tag)] = raw
    return V.received(d), charset_file


@pytest.mark.parametrize(
    "name", ["chrH31.dcm", "chrH32.dcm", "chrI2.dcm", "chrJapMulti.dcm", "chrJapMultiExplicitIR6.dcm", "chrX1.dcm"]
)
def test_iso2022_names_are_decoded_into_utf8_results(name: str, tmp_path: Path) -> None:
    """Defect 3 (ISO 2022 names): every result says the name pydicom reads in the source, in UTF-8."""
    src, charset_file = _with_charset_of(name)
    expected = str(charset_file.PatientName)
    mask = disc(48, 64, 30, 20, 9)
    (seg,) = build_results([SourceResult(src, [1], mask[None])], SEG)
    (sr,) = build_results([SourceResult(src, [1], None, [[]])], DET)
    sc = make_overlay(src, np.zeros((48, 64), np.float32), SourceResult(src, [1], mask[None]), 0, SEG)
    for obj, kind in ((seg, "seg"), (sr, "sr"), (sc, "sc")):
        stem = f"{name.split('.')[0]}_{kind}"
        warnings = dciodvfy(obj, tmp_path, stem)
        assert allowed(warnings) and all("DICOMDIR" in w for w in warnings), warnings
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("error")  # e.g. pydicom's "unknown escape sequence"
            back = dcmread(tmp_path / f"{stem}.dcm")
            assert str(back.PatientName) == expected
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert b"\x1b" not in (tmp_path / f"{stem}.dcm").read_bytes()
    hd.seg.segread(tmp_path / f"{name.split('.')[0]}_seg.dcm")
    hd.sr.srread(tmp_path / f"{name.split('.')[0]}_sr.dcm")
    hd.imread(tmp_path / f"{name.split('.')[0]}_sc.dcm")


def test_two_frames_of_a_single_frame_sop_class_are_referenced_without_frame_numbers(tmp_path: Path) -> None:
    """Defect 9: a Secondary Capture instance carrying 2 frames: no Referenced Frame Number for its class."""
    from pydicom.data import get_testdata_file

    full = dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    src = roundtrip(full)
    assert int(src.NumberOfFrames) == 2 and src.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    rows, cols = int(src.Rows), int(src.Columns)
    boxes = [[{"label": "nodule", "score": 0.8, "x0": 4, "y0": 5, "x1": 20, "y1": 25}] for _ in (1, 2)]
    masks = np.stack([disc(rows, cols, cols / 2, rows / 2, 20)] * 2)
    (det,) = build_results([SourceResult(src, [1, 2], None, boxes)], DET)
    (seg_sr,) = build_results([SourceResult(src, [1, 2], masks)], SEG)
    gray = full.pixel_array[1].mean(axis=-1).astype(np.float32)
    sc = make_overlay(src, gray, SourceResult(src, [1, 2], masks), 1, SEG)
    for obj, name in ((det, "sc2_det"), (seg_sr, "sc2_seg_sr"), (sc, "sc2_overlay")):
        dciodvfy(obj, tmp_path, name)
        assert not [e for e in obj.iterall() if e.keyword == "ReferencedFrameNumber"], name
    assert [fr for _, fr, *_ in _rois(det)] == [None, None]
    hd.sr.srread(tmp_path / "sc2_det.dcm")
    hd.imread(tmp_path / "sc2_overlay.dcm")
