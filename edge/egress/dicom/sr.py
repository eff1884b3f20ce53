"""TID 1500 Comprehensive SR results (Measurement Report), made with highdicom.

- Detection models: each box is a planar ROI (TID 1410) whose region is a
  closed ``POLYLINE`` SCOORD on the source image (and frame), with the score
  as a *Certainty of Finding* measurement in percent.
- Multi-frame sources (ultrasound cine): highdicom cannot write a SEG for a
  multi-frame image without a frame of reference (its issues #284/#200), so
  every processed frame's result becomes planar ROIs in one SR that
  reference the source instance **and frame number**: boxes as rectangles,
  segmentation masks as the closed outline of each region
  (:func:`edge.egress.dicom.outlines.mask_outlines`; regions under
  9 pixels are left out, at most 32 per frame and label). A PACS or viewer
  that shows SR SCOORDs (OHIF, Weasis, most PACS viewers) draws them on the
  right frame. See ``docs/dicom.md``.
- A source on which the model found nothing gets a TID 1501 group whose
  qualitative evaluation says *Absent*; the SR still lists the evaluated
  images in its image library.
- Classification models (:class:`~edge.egress.dicom.classification.ClassifiedSource`):
  one TID 1501 measurement group per processed frame, referencing the
  source image (and frame number, for a multi-frame source): finding type
  and a qualitative evaluation *<label> = Present / Absent* (CID 240) from
  the top label and the model's decision, the label's calibrated
  probability as a *Certainty of Finding* measurement in percent (as for
  detection boxes), and the algorithm's name, version and decision
  threshold (TID 4019 *Algorithm Parameters*).

The SR's observer device UID is derived from the appliance's Device Serial
Number and the model. For research models a TEXT item (*Comment*, DCM
121106) in a *Qualitative Evaluations* container (UMLS C0034375) at the
root of the report says ``NOT FOR CLINICAL USE``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from edge.egress.dicom.classification import ClassifiedSource, ClassifierInfo, threshold_parameter
from edge.egress.dicom.common import (
    MANUFACTURER,
    SERIES_NUMBER,
    ModelInfo,
    SourceResult,
    derived_uid,
    series_uid,
    device_serial,
    model_key,
    results_digest,
    equipment,
    label_code,
    research_statement,
    series_description,
    source_numbers,
)
from edge.egress.dicom.outlines import box_polygon, largest_outlines, mask_outlines
from edge.egress.dicom.reference import reference_dataset
from edge.errors import DataError

__all__ = ["make_findings_sr"]

_log = logging.getLogger(__name__)

_MIN_REGION_PIXELS = 9  # mask regions smaller than this are not outlined in an SR
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# One region of a frame: closed outline, label, score (detections only).
_Region = tuple[np.ndarray, str, "float | None"]


def make_findings_sr(
    sources: Sequence[SourceResult],
    model: ModelInfo,
    *,
    device_serial_number: str | None = None,
    instance_number: int | None = None,
) -> hd.sr.ComprehensiveSR:
    """A TID 1500 Comprehensive SR with one planar ROI per box or per mask region.

    Works for single- and multi-frame sources; ROIs on multi-frame sources
    carry the referenced frame number. An SR with no ROI (nothing found)
    still lists the evaluated images in its image library. For a
    classification model (``model.task``; ``sources`` are
    :class:`~edge.egress.dicom.classification.ClassifiedSource`) one
    measurement group per processed frame instead (see the module
    docstring).
    ``instance_number`` defaults to the smallest of the sources' (see
    :mod:`edge.egress.dicom.results`).
    """
    if not sources:
        raise DataError("No source instances to make an SR of.")
    refs = [reference_dataset(s.dataset) for s in sources]
    first = refs[0]
    serial = device_serial(device_serial_number)
    if instance_number is None:
        instance_number = min(source_numbers(sources).values())
    report = _measurement_report(sources, refs, model, serial)
    src_uids = sorted(str(r.SOPInstanceUID) for r in refs)
    key = model_key(model, serial, sources)  # other threshold or version: other UIDs
    return hd.sr.ComprehensiveSR(
        evidence=refs,
        content=report,
        series_instance_uid=series_uid(first, *key, "SR", "series"),
        series_number=SERIES_NUMBER["SR"],
        sop_instance_uid=derived_uid(*key, "SR", results_digest(sources), *src_uids),
        instance_number=int(instance_number),
        is_complete=True,
        series_description=series_description(model, "SR"),
        **equipment(model, serial),
    )


def _measurement_report(
    sources: Sequence[SourceResult], refs: Sequence[Dataset], model: ModelInfo, serial: str
) -> hd.sr.MeasurementReport:
    """The TID 1500 content: observer device, procedure, ROI groups, research statement."""
    first = refs[0]
    kwargs = dict(
        observation_context=hd.sr.ObservationContext(observer_device_context=_observer_device(model, serial)),
        procedure_reported=_procedure(str(first.get("Modality", "") or "")),
        imaging_measurements=(
            _classification_groups(sources, refs, model)
            if model.task == "classification"
            else _roi_groups(sources, refs, model)
        ),
        title=codes.DCM.ImagingMeasurementReport,
    )
    try:
        # The image library (TID 1600) lists the evaluated images; highdicom needs
        # modality-specific attributes for its descriptors (e.g. ImagerPixelSpacing for CR).
        report = hd.sr.MeasurementReport(**kwargs, referenced_images=refs)
    except (AttributeError, ValueError, TypeError) as exc:
        _log.debug("SR without image library (%s).", type(exc).__name__)
        report = hd.sr.MeasurementReport(**kwargs)
    statement = research_statement(model)
    if statement:
        report[0].ContentSequence.append(_research_container(statement))
    return report


def _observer_device(model: ModelInfo, serial: str) -> hd.sr.ObserverContext:
    """TID 1004 device observer: the appliance (its serial) running ``model``."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("medge-device", serial, model.name),
            name="medge",
            manufacturer_name=MANUFACTURER,
            model_name=model.name[:64] or "medge",
            serial_number=serial,
        ),
    )


def _procedure(modality: str) -> Code:
    """Procedure Reported for a source modality."""
    m = modality.upper()
    if m == "US":
        return codes.SCT.DiagnosticUltrasonography
    if m == "CT":
        return codes.LN.CTUnspecifiedBodyRegion
    return codes.SCT.ImagingProcedure


def _roi_groups(sources: Sequence[SourceResult], refs: Sequence[Dataset], model: ModelInfo) -> list[Any]:
    """Every source's planar ROI groups, frame by frame; an *Absent* group for a source with none."""
    groups: list[Any] = []
    for src, ds in zip(sources, refs):
        found_any = False
        for idx, frame in enumerate(src.frames):
            regions = _frame_regions(src, idx, model, rows=int(ds.Rows), cols=int(ds.Columns))
            found_any = found_any or bool(regions)
            for n, region in enumerate(regions, start=1):
                groups.append(_roi_group(ds, frame, src, n, region, model))
        if not found_any:
            groups.append(_absent_group(src, ds, model))
    return groups


def _frame_regions(src: SourceResult, idx: int, model: ModelInfo, *, rows: int, cols: int) -> list[_Region]:
    """The regions of processed frame ``idx``: its boxes (detection) or its mask's outlines per label."""
    regions: list[_Region] = []
    if model.task == "detection":
        for box in src.boxes[idx] if idx < len(src.boxes) else []:
            regions.append((box_polygon(box, cols, rows), str(box["label"]), float(box["score"])))
        return regions
    if src.masks is None:
        return regions
    label_map = src.masks[idx]
    for value, label in enumerate(model.labels, start=1):
        for outline in largest_outlines(mask_outlines(label_map == value, min_pixels=_MIN_REGION_PIXELS)):
            regions.append((outline, label, None))
    return regions


def _roi_group(
    ds: Dataset, frame: Any, src: SourceResult, n: int, region: _Region, model: ModelInfo
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one region: its outline on the source image (and frame), its score if any."""
    poly, label, score = region
    ref = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        referenced_frame_numbers=[int(frame)] if src.frame_references else None,
    )
    where = f"frame {frame} " if src.multiframe else ""
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(ds.SOPInstanceUID, frame, model.name, n, "roi"),
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
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=poly.astype(np.float32),
            source_image=ref,
        ),
        finding_type=label_code(label),
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version or "0"),
        measurements=measurements,
    )


def _absent_group(src: SourceResult, ds: Dataset, model: ModelInfo) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group saying the model found nothing on this source (and its processed frames)."""
    label = model.labels[0] if model.labels else "finding"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(ds.SOPInstanceUID, model.name, "absent"), identifier=f"no {label}"[:64]
        ),
        finding_type=label_code(label),
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version or "0"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=label_code(label), value=codes.SCT.Absent)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=[int(f) for f in src.frames] if src.frame_references else None,
            )
        ],
    )


def _classification_groups(
    sources: Sequence[SourceResult], refs: Sequence[Dataset], model: ModelInfo
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per processed frame of every source: the model's classification of it."""
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for src, ds in zip(sources, refs):
        if not isinstance(src, ClassifiedSource):
            raise DataError("A classification SR needs the classification of every source instance.")
        for idx, frame in enumerate(src.frames):
            groups.append(_classification_group(ds, src, idx, int(frame), model))
    return groups


def _classification_group(
    ds: Dataset, src: ClassifiedSource, idx: int, frame: int, model: ModelInfo
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one frame: finding, Present/Absent, certainty, algorithm and threshold, source image."""
    label, score, decision = src.top(idx)
    threshold = src.threshold if src.threshold is not None else _model_threshold(model)
    parameters = [threshold_parameter(threshold)] if threshold is not None else None
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version or "0", parameters=parameters)
    where = f" frame {frame}" if src.multiframe else ""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(ds.SOPInstanceUID, frame, model.name, "classification"),
            identifier=f"{label}{where}"[:64],
        ),
        finding_type=label_code(label),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.CertaintyOfFinding,
                value=round(100.0 * score, 2),
                unit=codes.UCUM.Percent,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=label_code(label), value=codes.SCT.Present if decision else codes.SCT.Absent
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=[frame] if src.frame_references else None,
            )
        ],
    )


def _model_threshold(model: ModelInfo) -> float | None:
    """The decision threshold ``model`` runs with, when its info carries one."""
    return model.threshold if isinstance(model, ClassifierInfo) else None


def _research_container(text: str) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: a Qualitative Evaluations container holding the statement as a Comment."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container
