"""Result objects (SEG, TID 1500 SR, SC overlay): dciodvfy-clean, and they read back to what went in."""

from __future__ import annotations

import io
import warnings as pywarnings
import shutil
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

from edge.egress.dicom_results import ModelInfo, SourceResult, build_results, make_overlay, series_description
from tests.edge import dicom_factory as f

DCIODVFY = "/usr/bin/dciodvfy"


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
    if not Path(DCIODVFY).exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    p = tmp_path / f"{name}.dcm"
    ds.save_as(p, enforce_file_format=True)
    out = subprocess.run([DCIODVFY, str(p)], capture_output=True, text=True, timeout=60)
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
    assert sc.InstanceNumber == 3
    # See test_us_overlay_laterality_follows_the_source: no body part, no side -> empty, one warning.
    assert only_unknown_laterality(dciodvfy(sc, tmp_path, "us_cine_overlay_sc"))


def test_series_description_fits_and_flags_research_models() -> None:
    long = ModelInfo("m" * 70, "1", "segmentation")
    assert len(series_description(long, "SEG")) <= 64
    assert series_description(long, "SEG").endswith("NOT FOR CLINICAL USE")
    assert "CLINICAL" not in series_description(ModelInfo("x", "1", "detection", research_only=False), "SR")


def test_tools_present() -> None:
    # The real peers this suite relies on (installed by .ci/run).
    for tool in ("/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu", DCIODVFY):
        assert shutil.which(tool), f"{tool} is missing: apt-get install dcmtk dicom3tools"
