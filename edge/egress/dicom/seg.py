"""DICOM Segmentation results of segmentation models, made with highdicom.

A BINARY Segmentation, one segment per label, referencing the source
instances, in the same study and a new series. Single-frame sources with a
complete patient coordinate system (Frame of Reference, Image
Position/Orientation (Patient), Pixel Spacing and Slice Thickness: CT, MR
slices) give one SEG per frame of reference, in that frame of reference.
Single-frame sources without one (US, CR, DX, secondary capture; also an
ultrasound image that has a Frame of Reference UID and Pixel Spacing but no
image plane) give one SEG per instance in which every pixel corresponds to a
pixel of its source through the Derivation Image functional group: no Frame
of Reference, no Pixel Measures (PS3.3 A.51.5.1: with a Frame of Reference
UID the segment would have to be placed with Pixel Measures, Plane Position
and Plane Orientation, which such a source cannot give; the spacing stays
with the referenced source). Which sources get a SEG and which an SR is
decided by :func:`edge.egress.dicom.results.build_results`.

For research models the SEG's Content Description says ``NOT FOR CLINICAL
USE``.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from edge.egress.dicom.common import (
    NOT_CLINICAL,
    SERIES_NUMBER,
    ModelInfo,
    SourceResult,
    derived_uid,
    series_uid,
    device_serial,
    model_key,
    results_digest,
    equipment,
    has_patient_geometry,
    label_code,
    patient_orientation,
    series_description,
    source_numbers,
)
from edge.egress.dicom.reference import reference_dataset
from edge.errors import DataError

__all__ = ["make_segmentation"]


def make_segmentation(
    sources: Sequence[SourceResult],
    model: ModelInfo,
    *,
    device_serial_number: str | None = None,
    instance_number: int | None = None,
) -> hd.seg.Segmentation:
    """A BINARY Segmentation of single-frame ``sources`` (one segment per label).

    All sources share a study and series; several sources must share a
    complete patient coordinate system (CT/MR slices). A source without one
    gives a SEG aligned pixel for pixel with it, without a Frame of
    Reference. Empty masks still give a valid SEG (one all-zero frame per
    source), so "nothing found" is an answer a PACS can show.
    ``instance_number`` defaults to the first source's Instance Number.
    """
    if not sources:
        raise DataError("No source instances to make a Segmentation of.")
    if any(s.multiframe for s in sources):
        raise DataError("make_segmentation takes single-frame sources; multi-frame results go into an SR.")
    if any(s.masks is None or len(s.masks) != 1 for s in sources):
        raise DataError("Every source needs exactly one mask for a Segmentation.")
    geometry = all(has_patient_geometry(s.dataset) for s in sources)
    if len(sources) > 1 and not geometry:
        raise DataError("Several sources in one Segmentation need a complete patient coordinate system.")
    refs = [reference_dataset(s.dataset, keep_geometry=geometry) for s in sources]
    stack = np.stack([s.masks[0] for s in sources]).astype(np.uint8)  # type: ignore[index]
    n_labels = max(1, len(model.labels))
    stack[stack > n_labels] = 0
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=label_code(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model),
        )
        for i, label in enumerate(model.labels[:n_labels] or ("finding",))
    ]
    first = refs[0]
    src_uids = sorted(str(r.SOPInstanceUID) for r in refs)
    serial = device_serial(device_serial_number)
    key = model_key(model, serial, sources)  # another model version: other UIDs
    if instance_number is None:
        instance_number = source_numbers(sources)[str(sources[0].dataset.SOPInstanceUID)]
    pixel_array = stack if n_labels > 1 else stack.astype(bool)
    seg = hd.seg.Segmentation(
        source_images=refs,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid(first, *key, "SEG", "series"),
        series_number=SERIES_NUMBER["SEG"],
        sop_instance_uid=derived_uid(*key, "SEG", results_digest(sources), *src_uids),
        instance_number=int(instance_number),
        series_description=series_description(model, "SEG"),
        content_description=_content_description(model),
        omit_empty_frames=False,
        **equipment(model, serial),
    )
    if "FrameOfReferenceUID" not in seg:
        # General Image Patient Orientation: Type 2C when there is no image plane; empty when unknown.
        seg.PatientOrientation = patient_orientation(first)
    return seg


def _content_description(model: ModelInfo) -> str:
    """SEG Content Description (LO, 64 chars): the research statement, else the model."""
    if model.research_only:
        return f"{NOT_CLINICAL} - research use only"
    return f"{model.name} {model.version}".strip()[:64]


def _algorithm(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """The segments' Segmentation Algorithm Identification: the model, an AI algorithm."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name, version=model.version or "0", family=codes.DCM.ArtificialIntelligence
    )
