"""Inference results as DICOM objects, made with highdicom.

- Segmentation models -> a DICOM **Segmentation** (BINARY, one segment per
  label, referencing the source instances, same study and frame of
  reference, new series). Single-frame sources with a frame of reference
  (CT, MR slices) give one SEG per series; single-frame sources without one
  (US, CR, DX, secondary capture) give one SEG per instance, which is what
  highdicom (and the standard's spatial rules) allow.
- Detection models -> a **Comprehensive SR** following TID 1500 (Measurement
  Report): each box is a planar ROI (TID 1410) whose region is a closed
  ``POLYLINE`` SCOORD on the source image (and frame), with the score as a
  *Certainty of Finding* measurement in percent.
- Multi-frame sources (ultrasound cine): highdicom cannot write a SEG for a
  multi-frame image without a frame of reference (its issues #284/#200), so
  every processed frame's result becomes planar ROIs in one TID 1500 SR that
  reference the source instance **and frame number**: boxes as rectangles,
  segmentation masks as the closed outline of each region. A PACS or viewer
  that shows SR SCOORDs (OHIF, Weasis, most PACS viewers) draws them on the
  right frame. See ``docs/dicom.md``.
- Optionally a **secondary-capture overlay** (RGB, result burned in) per
  source instance, for viewers that show neither SEG nor SR.

Every UID of a result is derived from its inputs (source UIDs, model,
kind), so processing the same instances again after a crash makes the same
objects and a PACS sees a resend, not a duplicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from edge import __version__
from edge.errors import DataError

__all__ = [
    "ModelInfo",
    "SourceResult",
    "series_description",
    "mask_outlines",
    "make_segmentation",
    "make_findings_sr",
    "make_overlay",
    "build_results",
]

_log = logging.getLogger(__name__)

_MANUFACTURER = "medge"
_SERIES_NUMBER = {"SEG": 9901, "SR": 9902, "SC": 9903}
_NOT_CLINICAL = "NOT FOR CLINICAL USE"
_MIN_REGION_PIXELS = 9  # mask regions smaller than this are not outlined in an SR
_MAX_REGIONS = 32  # per frame and label
_MAX_VERTICES = 2000  # per outline
_PLANE_KEYS = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
# Body Part Examined defined terms of unpaired structures (PS3.16 Annex L, as dciodvfy knows
# them). For these the General Series Laterality (Type 2C, "required if the body part examined
# is a paired structure") must be absent; for any other body part, or none, it is required and
# is empty when not known.
_UNPAIRED_BODY_PARTS = frozenset(
    """ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST CHESTABDOMEN
    CHESTABDPELVIS CIRCLEOFWILLIS COCCYX COLON CORONARYARTERY CSPINE CTSPINE DUODENUM ESOPHAGUS
    FACE GALLBLADDER HEAD HEADNECK HEART ILEUM ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE
    MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE PANCREAS
    PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP SKULL SPINE SPLEEN SSPINE STERNUM STOMACH THYMUS
    THYROID TLSPINE TONGUE TRACHEA TSPINE URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY""".split()
)


@dataclass(frozen=True)
class ModelInfo:
    """What the results say about the model that made them."""

    name: str
    version: str
    task: str  # "segmentation" | "detection"
    labels: tuple[str, ...] = ("finding",)
    research_only: bool = True


@dataclass
class SourceResult:
    """One source instance (read without pixel data is enough) and its results.

    ``frames`` are 1-based frame numbers that were processed; ``masks``
    ``[n, H, W]`` uint8 label maps per processed frame (segmentation);
    ``boxes`` per processed frame a list of dicts with
    ``label score x0 y0 x1 y1`` in source pixel coordinates (detection).
    """

    dataset: Dataset
    frames: list[int]
    masks: np.ndarray | None = None
    boxes: list[list[dict]] = field(default_factory=list)

    @property
    def multiframe(self) -> bool:
        """Whether the source has more than one frame."""
        return int(getattr(self.dataset, "NumberOfFrames", 1) or 1) > 1


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def series_description(model: ModelInfo, kind: str) -> str:
    """``<model> <kind>`` plus ``NOT FOR CLINICAL USE`` for research models (64 chars max)."""
    text = f"{model.name} {kind}"
    if model.research_only:
        text = f"{text} {_NOT_CLINICAL}"
    if len(text) > 64:
        keep = 64 - (len(_NOT_CLINICAL) + 1 if model.research_only else 0)
        text = f"{model.name} {kind}"[:keep].rstrip() + (f" {_NOT_CLINICAL}" if model.research_only else "")
    return text


def _label_code(label: str) -> Code:
    known = {"lesion": codes.SCT.Lesion, "nodule": codes.SCT.Nodule, "mass": codes.SCT.Mass}
    return known.get(label.lower(), codes.SCT.Finding)


def _procedure(modality: str) -> Code:
    m = modality.upper()
    if m == "US":
        return codes.SCT.DiagnosticUltrasonography
    if m == "CT":
        return codes.LN.CTUnspecifiedBodyRegion
    return codes.SCT.ImagingProcedure


def _algorithm(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model.name, version=model.version or "0", family=codes.DCM.ArtificialIntelligence
    )


# --------------------------------------------------------------------------- outlines
# Directions as (dx, dy) in image coordinates (x right, y down); index order is clockwise.
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def mask_outlines(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """Closed outer outlines of the regions of a binary mask, on pixel corners.

    Each outline is a float ``[N, 2]`` array of (column, row) vertices, with
    the first vertex repeated at the end, traced clockwise along pixel edges
    (4-connected regions; holes are not outlined). Rasterising an outline
    gives the region back exactly when it has no holes.

    Examples
    --------
    >>> m = np.zeros((4, 5), np.uint8); m[1:3, 1:4] = 1
    >>> mask_outlines(m)[0].tolist()
    [[1.0, 1.0], [4.0, 1.0], [4.0, 3.0], [1.0, 3.0], [1.0, 1.0]]
    """
    fg = np.pad(np.asarray(mask) > 0, 1)
    inner = fg[1:-1, 1:-1]
    if not inner.any():
        return []
    edges: dict[tuple[int, int], list[int]] = {}
    rows, cols = np.nonzero(inner)
    # (start-vertex offset, direction) of each pixel's boundary edge, when its neighbour is background.
    checks = (
        (~fg[:-2, 1:-1], (0, 0), 0),  # top: (c, r) -> (c+1, r), east
        (~fg[1:-1, 2:], (1, 0), 1),  # right: (c+1, r) -> (c+1, r+1), south
        (~fg[2:, 1:-1], (1, 1), 2),  # bottom: (c+1, r+1) -> (c, r+1), west
        (~fg[1:-1, :-2], (0, 1), 3),  # left: (c, r+1) -> (c, r), north
    )
    for open_side, (ox, oy), d in checks:
        sel = open_side[rows, cols]
        for r, c in zip(rows[sel].tolist(), cols[sel].tolist()):
            edges.setdefault((c + ox, r + oy), []).append(d)
    outlines: list[np.ndarray] = []
    while edges:
        # Start where only one edge leaves, so the walk closes exactly when it comes back.
        start = next((k for k, o in edges.items() if len(o) == 1), next(iter(edges)))
        pts = [start]
        v, d = start, -1
        while True:
            outs = edges[v]
            if d >= 0 and len(outs) > 1:
                # Diagonal touch: turn right first, which keeps 4-connected regions apart.
                d = next((d + t) % 4 for t in (1, 0, 3) if (d + t) % 4 in outs)
            else:
                d = outs[0]
            outs.remove(d)
            if not outs:
                del edges[v]
            v = (v[0] + _DIRS[d][0], v[1] + _DIRS[d][1])
            if v == start:
                break
            pts.append(v)
        arr = np.asarray(pts + [start], dtype=np.float64)
        x, y = arr[:, 0], arr[:, 1]
        area = 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
        if area >= min_pixels:  # clockwise in image coordinates: an outer boundary, not a hole
            outlines.append(_drop_collinear(arr))
    return outlines


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on a straight run; keeps the closing vertex."""
    ring = pts[:-1]
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    cross = (ring[:, 0] - prev[:, 0]) * (nxt[:, 1] - ring[:, 1]) - (ring[:, 1] - prev[:, 1]) * (nxt[:, 0] - ring[:, 0])
    kept = ring[cross != 0]
    return np.vstack([kept, kept[:1]])


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])))


def _largest(outlines: list[np.ndarray]) -> list[np.ndarray]:
    """At most ``_MAX_REGIONS`` outlines (largest first), each at most ``_MAX_VERTICES`` vertices.

    Keeps every SR small and every GraphicData far below the 64 KiB an
    explicit-VR ``FL`` element can hold.
    """
    keep = sorted(outlines, key=_area, reverse=True)[:_MAX_REGIONS]
    out = []
    for poly in keep:
        if len(poly) > _MAX_VERTICES:
            step = int(np.ceil((len(poly) - 1) / (_MAX_VERTICES - 1)))
            ring = poly[:-1][::step]
            poly = np.vstack([ring, ring[:1]])
        out.append(poly)
    return out


def _rectangle(box: dict, cols: int, rows: int) -> np.ndarray:
    x0 = float(np.clip(box["x0"], 0, cols))
    x1 = float(np.clip(box["x1"], 0, cols))
    y0 = float(np.clip(box["y0"], 0, rows))
    y1 = float(np.clip(box["y1"], 0, rows))
    if x1 <= x0:
        x1 = min(float(cols), x0 + 1.0)
    if y1 <= y0:
        y1 = min(float(rows), y0 + 1.0)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


# --------------------------------------------------------------------------- SEG
def make_segmentation(sources: Sequence[SourceResult], model: ModelInfo) -> hd.seg.Segmentation:
    """A BINARY Segmentation of single-frame ``sources`` (one segment per label).

    All sources share a study and series; with several sources they must
    share a frame of reference (CT/MR slices). Empty masks still give a
    valid SEG (one all-zero frame per source), so "nothing found" is an
    answer a PACS can show.
    """
    if not sources:
        raise DataError("No source instances to make a Segmentation of.")
    if any(s.multiframe for s in sources):
        raise DataError("make_segmentation takes single-frame sources; multi-frame results go into an SR.")
    if any(s.masks is None or len(s.masks) != 1 for s in sources):
        raise DataError("Every source needs exactly one mask for a Segmentation.")
    stack = np.stack([s.masks[0] for s in sources]).astype(np.uint8)  # type: ignore[index]
    n_labels = max(1, len(model.labels))
    stack[stack > n_labels] = 0
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=_label_code(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model),
        )
        for i, label in enumerate(model.labels[:n_labels] or ("finding",))
    ]
    first = sources[0].dataset
    src_uids = sorted(str(s.dataset.SOPInstanceUID) for s in sources)
    pixel_array = stack if n_labels > 1 else stack.astype(bool)
    seg = hd.seg.Segmentation(
        source_images=[s.dataset for s in sources],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(first.SeriesInstanceUID, model.name, "SEG", "series"),
        series_number=_SERIES_NUMBER["SEG"],
        sop_instance_uid=_uid(model.name, model.version, "SEG", *src_uids),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=model.name[:64],
        software_versions=f"medge {__version__}",
        device_serial_number="0",
        series_description=series_description(model, "SEG"),
        omit_empty_frames=False,
    )
    if "FrameOfReferenceUID" not in first and "PatientOrientation" not in seg:
        # General Image: Type 2C when there is no image plane; empty when the source does not say.
        orientation = list(getattr(first, "PatientOrientation", []) or [])
        seg.PatientOrientation = orientation if len(orientation) == 2 else ""
    return seg


# --------------------------------------------------------------------------- SR
def _roi_groups(sources: Sequence[SourceResult], model: ModelInfo) -> list[Any]:
    groups: list[Any] = []
    for src in sources:
        ds = src.dataset
        rows, cols = int(ds.Rows), int(ds.Columns)
        multiframe = src.multiframe
        found_any = False
        for idx, frame in enumerate(src.frames):
            ref = hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=[int(frame)] if multiframe else None,
            )
            regions: list[tuple[np.ndarray, str, float | None]] = []
            if model.task == "detection":
                for box in src.boxes[idx] if idx < len(src.boxes) else []:
                    regions.append((_rectangle(box, cols, rows), str(box["label"]), float(box["score"])))
            else:
                if src.masks is None:
                    continue
                label_map = src.masks[idx]
                for value, label in enumerate(model.labels, start=1):
                    for outline in _largest(mask_outlines(label_map == value, min_pixels=_MIN_REGION_PIXELS)):
                        regions.append((outline, label, None))
            found_any = found_any or bool(regions)
            for n, (poly, label, score) in enumerate(regions, start=1):
                where = f"frame {frame} " if multiframe else ""
                tracking = hd.sr.TrackingIdentifier(
                    uid=_uid(ds.SOPInstanceUID, frame, model.name, n, "roi"),
                    identifier=f"{label} {n} {where}".strip()[:64],
                )
                measurements = None
                if score is not None:
                    measurements = [
                        hd.sr.Measurement(
                            name=codes.DCM.CertaintyOfFinding,
                            value=round(100.0 * score, 2),
                            unit=codes.UCUM.Percent,
                        )
                    ]
                groups.append(
                    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        referenced_region=hd.sr.ImageRegion(
                            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                            graphic_data=poly.astype(np.float32),
                            source_image=ref,
                        ),
                        finding_type=_label_code(label),
                        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version or "0"),
                        measurements=measurements,
                    )
                )
        if not found_any:
            groups.append(_absent_group(src, model))
    return groups


def _absent_group(src: SourceResult, model: ModelInfo) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group saying the model found nothing on this source (and its processed frames)."""
    ds = src.dataset
    label = model.labels[0] if model.labels else "finding"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(ds.SOPInstanceUID, model.name, "absent"), identifier=f"no {label}"[:64]
        ),
        finding_type=_label_code(label),
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version or "0"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_label_code(label), value=codes.SCT.Absent)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=[int(f) for f in src.frames] if src.multiframe else None,
            )
        ],
    )


def make_findings_sr(sources: Sequence[SourceResult], model: ModelInfo) -> hd.sr.ComprehensiveSR:
    """A TID 1500 Comprehensive SR with one planar ROI per box or per mask region.

    Works for single- and multi-frame sources; ROIs on multi-frame sources
    carry the referenced frame number. An SR with no ROI (nothing found)
    still lists the evaluated images in its image library.
    """
    if not sources:
        raise DataError("No source instances to make an SR of.")
    first = sources[0].dataset
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("medge-device", model.name),
            name="medge",
            manufacturer_name=_MANUFACTURER,
            model_name=model.name[:64],
        ),
    )
    groups = _roi_groups(sources, model)
    kwargs = dict(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_procedure(str(getattr(first, "Modality", ""))),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    try:
        # The image library (TID 1600) lists the evaluated images; highdicom needs
        # modality-specific attributes for its descriptors (e.g. ImagerPixelSpacing for CR).
        report = hd.sr.MeasurementReport(**kwargs, referenced_images=[s.dataset for s in sources])
    except (AttributeError, ValueError, TypeError) as exc:
        _log.debug("SR without image library (%s).", exc)
        report = hd.sr.MeasurementReport(**kwargs)
    src_uids = sorted(str(s.dataset.SOPInstanceUID) for s in sources)
    return hd.sr.ComprehensiveSR(
        evidence=[s.dataset for s in sources],
        content=report,
        series_instance_uid=_uid(first.SeriesInstanceUID, model.name, "SR", "series"),
        series_number=_SERIES_NUMBER["SR"],
        sop_instance_uid=_uid(model.name, model.version, "SR", *src_uids),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        is_complete=True,
        series_description=series_description(model, "SR"),
    )


# --------------------------------------------------------------------------- overlay
def _draw_overlay(gray: np.ndarray, mask: np.ndarray | None, boxes: Sequence[dict]) -> np.ndarray:
    """RGB uint8 image: grayscale background, mask tinted red, boxes outlined green."""
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)
    lo, hi = float(g.min()), float(g.max())
    base = ((g - lo) / (hi - lo) * 255.0) if hi > lo else np.zeros_like(g)
    rgb = np.repeat(base.astype(np.uint8)[..., None], 3, axis=2)
    if mask is not None:
        m = mask > 0
        rgb[m, 0] = 255
        rgb[m, 1] = (rgb[m, 1] * 0.5).astype(np.uint8)
        rgb[m, 2] = (rgb[m, 2] * 0.5).astype(np.uint8)
    h, w = rgb.shape[:2]
    for b in boxes:
        x0, x1 = int(np.clip(b["x0"], 0, w - 1)), int(np.clip(b["x1"], 0, w - 1))
        y0, y1 = int(np.clip(b["y0"], 0, h - 1)), int(np.clip(b["y1"], 0, h - 1))
        rgb[y0 : y1 + 1, [x0, x1]] = (0, 255, 0)
        rgb[[y0, y1], x0 : x1 + 1] = (0, 255, 0)
    return rgb


def _laterality(source: Dataset) -> tuple[str | None, bool]:
    """(``R``/``L`` or ``None``, whether General Series Laterality belongs in an image of ``source``).

    The source's own Laterality, else its Image Laterality (DX, MG), when it
    is ``R`` or ``L``. Laterality belongs unless Body Part Examined names an
    unpaired structure.
    """
    body_part = str(getattr(source, "BodyPartExamined", "") or "").strip().upper()
    if body_part in _UNPAIRED_BODY_PARTS:
        return None, False
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(getattr(source, keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value, True
    return None, True


def make_overlay(source: Dataset, frame_pixels: np.ndarray, result: SourceResult, index: int, model: ModelInfo) -> hd.sc.SCImage:
    """A secondary-capture RGB image of one processed frame with the result burned in.

    General Series Laterality (Type 2C) follows the source: ``R``/``L`` when
    the source says so; absent when its Body Part Examined is an unpaired
    structure; otherwise (a paired or unnamed body part of unknown side)
    present and empty, which the standard allows when the side is unknown.
    """
    frame = result.frames[index]
    mask = result.masks[index] if result.masks is not None else None
    boxes = result.boxes[index] if index < len(result.boxes) else []
    rgb = _draw_overlay(frame_pixels, mask, boxes)
    laterality, laterality_applies = _laterality(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # placeholder required by highdicom; replaced below
        series_instance_uid=_uid(source.SeriesInstanceUID, model.name, "SC", "series"),
        series_number=_SERIES_NUMBER["SC"],
        sop_instance_uid=_uid(model.name, model.version, "SC", source.SOPInstanceUID, frame),
        instance_number=int(frame),
        manufacturer=_MANUFACTURER,
        series_description=series_description(model, "overlay"),
        laterality=hd.LateralityValues(laterality) if laterality else None,
    )
    sc.BurnedInAnnotation = "YES"  # the result is drawn into the pixels
    src_orientation = list(getattr(source, "PatientOrientation", []) or [])
    sc.PatientOrientation = src_orientation if len(src_orientation) == 2 else []  # Type 2: empty when unknown
    if getattr(source, "BodyPartExamined", ""):
        sc.BodyPartExamined = source.BodyPartExamined  # what the Laterality condition is judged by
    if laterality_applies and "Laterality" not in sc:
        # Type 2C, required for a paired (or unnamed) body part: empty = side unknown. highdicom
        # has no way to write an empty value (its None omits the attribute).
        sc.Laterality = ""
    elif not laterality_applies and "Laterality" in sc:
        del sc.Laterality
    return sc


# --------------------------------------------------------------------------- dispatch
def build_results(sources: Sequence[SourceResult], model: ModelInfo) -> list[Dataset]:
    """The result objects for one completed series (see the module docstring).

    Returns
    -------
    list of pydicom.dataset.Dataset
        SEG(s) for segmentation of single-frame sources, else one SR.
    """
    if not sources:
        return []
    if model.task == "detection":
        return [make_findings_sr(sources, model)]
    single = [s for s in sources if not s.multiframe]
    multi = [s for s in sources if s.multiframe]
    out: list[Dataset] = []
    if single:
        # Slices with a patient coordinate system (frame of reference + image plane) share one SEG.
        planar = [s for s in single if all(k in s.dataset for k in _PLANE_KEYS)]
        alone = [s for s in single if not all(k in s.dataset for k in _PLANE_KEYS)]
        by_for: dict[str, list[SourceResult]] = {}
        for s in planar:
            by_for.setdefault(str(s.dataset.FrameOfReferenceUID), []).append(s)
        for group in by_for.values():
            group.sort(key=lambda s: int(getattr(s.dataset, "InstanceNumber", 0) or 0))
            if len(group) == 1:
                alone.extend(group)
                continue
            try:
                out.append(make_segmentation(group, model))
            except ValueError as exc:  # e.g. inconsistent geometry across the slices
                _log.warning("One SEG per instance for a series highdicom cannot segment as a whole: %s", exc)
                alone.extend(group)
        for s in alone:
            out.append(make_segmentation([s], model))
    if multi:
        out.append(make_findings_sr(multi, model))
    return out
