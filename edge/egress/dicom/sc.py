"""Secondary-capture overlays: the result burned into an RGB copy of a source frame.

An optional result, one per processed source frame, for viewers that show
neither SEG nor SR (the pixels: :func:`edge.egress.dicom.outlines.draw_overlay`).
It references its source image and frame in Source Image Sequence. Its
Instance Number is ``10000 x n + frame number``, where ``n`` is the
number its source's result takes (see :mod:`edge.egress.dicom.results`), so
overlays of different instances and frames of one series never share a
number and sort like their sources. For research models its Image Comments
say ``NOT FOR CLINICAL USE``. Its SOP Instance UID is derived from the
source and frame, the model and its configuration
(:func:`~edge.egress.dicom.common.model_key`) and a digest of its pixels and
comment: the same overlay made again has the same UID, another one (e.g. at
another decision threshold) another UID.

For a classification model
(:class:`~edge.egress.dicom.classification.ClassifiedSource`) the overlay
shows the frame's class activation map instead: red, its opacity
proportional to the map (relative within the frame and scaled by the
frame's calibrated score, so a frame the model finds negative stays grey),
and, when the decision threshold is known, the edge of the region at or
above it in yellow (only a frame whose score reaches the threshold has one). Its Image Comments
state the label, the decision and the certainty. A map shows where the
model's evidence lies; it is not an outline of a finding.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from edge.egress.dicom.classification import ClassifiedSource
from edge.egress.dicom.common import (
    FRAMES_PER_INSTANCE_NUMBER,
    IS_MAX,
    SERIES_NUMBER,
    ModelInfo,
    SourceResult,
    derived_uid,
    series_uid,
    device_serial,
    model_key,
    equipment,
    patient_orientation,
    research_statement,
    series_description,
    source_numbers,
)
from edge.egress.dicom.outlines import draw_overlay, mask_boundary
from edge.egress.dicom.reference import reference_dataset
from edge.errors import DataError

__all__ = ["make_overlay"]

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
# Source image of an overlay (CID 7202).
_SOURCE_IMAGE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
# A class activation map over the frame: red at up to this opacity (map 255), the threshold's edge in yellow.
_HEAT_ALPHA = 0.6
_HEAT_RGB = (255, 0, 0)
_EDGE_RGB = (255, 255, 0)


def make_overlay(
    source: Dataset,
    frame_pixels: np.ndarray,
    result: SourceResult,
    index: int,
    model: ModelInfo,
    *,
    device_serial_number: str | None = None,
    series: Sequence[SourceResult] | None = None,
    instance_number: int | None = None,
) -> hd.sc.SCImage:
    """A secondary-capture RGB image of one processed frame with the result burned in.

    It references its source image (and frame, for a multi-frame source) in
    Source Image Sequence. Its Instance Number is ``10000 x n + frame``,
    where ``n`` is the source's number among ``series`` (all the sources of
    the result series, as given to
    :func:`~edge.egress.dicom.results.build_results`; default: the
    source's own Instance Number), unless ``instance_number`` is given.

    General Series Laterality (Type 2C) follows the source: ``R``/``L`` when
    the source says so; absent when its Body Part Examined is an unpaired
    structure; otherwise (a paired or unnamed body part of unknown side)
    present and empty, which the standard allows when the side is unknown.
    Patient Orientation is the source's, else derived from its Image
    Orientation (Patient), else empty (Type 2C, unknown).

    Raises
    ------
    DataError
        A classified frame without its class activation map (or with one
        of another size than the frame).
    """
    frame = int(result.frames[index])
    if isinstance(result, ClassifiedSource):
        rgb = _heat_overlay(frame_pixels, result, index)
    else:
        mask = result.masks[index] if result.masks is not None else None
        boxes = result.boxes[index] if index < len(result.boxes) else []
        rgb = draw_overlay(frame_pixels, mask, boxes)
    ref = reference_dataset(source)
    laterality, laterality_applies = _laterality(ref)
    if instance_number is None:
        instance_number = _instance_number(source, result, frame, series)
    statement = research_statement(model)
    serial = device_serial(device_serial_number)
    key = model_key(model, serial, [result])
    comment = _classification_comment(result, index)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # placeholder required by highdicom; replaced below
        series_instance_uid=series_uid(ref, *key, "SC", "series"),
        series_number=SERIES_NUMBER["SC"],
        sop_instance_uid=derived_uid(*key, "SC", ref.SOPInstanceUID, frame, _pixels_digest(rgb, comment)),
        instance_number=int(instance_number),
        series_description=series_description(model, "overlay"),
        laterality=hd.LateralityValues(laterality) if laterality else None,
        **equipment(model, serial),
    )
    sc.BurnedInAnnotation = "YES"  # the result is drawn into the pixels
    sc.PatientOrientation = patient_orientation(ref)  # Type 2C: empty when unknown
    sc.SourceImageSequence = [_source_image(ref, frame if result.frame_references else None)]
    sc.DerivationDescription = _derivation(result, index, model)
    comments = [c for c in (comment, statement) if c]
    if comments:
        sc.ImageComments = " ".join(comments)
    if ref.get("BodyPartExamined", ""):
        sc.BodyPartExamined = ref.BodyPartExamined  # what the Laterality condition is judged by
    if laterality_applies and "Laterality" not in sc:
        # Type 2C, required for a paired (or unnamed) body part: empty = side unknown. highdicom
        # has no way to write an empty value (its None omits the attribute).
        sc.Laterality = ""
    elif not laterality_applies and "Laterality" in sc:
        del sc.Laterality
    return sc


def _pixels_digest(rgb: np.ndarray, comment: str | None) -> str:
    """SHA-256 of what the overlay shows (pixels, classification comment): part of its UID."""
    h = hashlib.sha256(np.ascontiguousarray(rgb).tobytes())
    h.update(f"{rgb.shape}|{comment}".encode())
    return h.hexdigest()


def _heat_overlay(frame_pixels: np.ndarray, result: ClassifiedSource, index: int) -> np.ndarray:
    """RGB uint8 frame with its class activation map in red and the threshold's edge in yellow."""
    heat = result.heatmap(index)
    if heat is None:
        raise DataError(f"Processed frame {index + 1} has no class activation map to draw.")
    rgb = draw_overlay(frame_pixels, None, [])
    if heat.shape != rgb.shape[:2]:
        raise DataError(f"The class activation map {heat.shape} is not the frame's size {rgb.shape[:2]}.")
    alpha = heat.astype(np.float32)[..., None] * np.float32(_HEAT_ALPHA / 255.0)
    blend = rgb.astype(np.float32) * (1.0 - alpha) + np.asarray(_HEAT_RGB, np.float32) * alpha
    out = np.rint(blend).clip(0, 255).astype(np.uint8)
    if result.threshold is not None:
        out[mask_boundary(heat >= round(255.0 * result.threshold))] = _EDGE_RGB
    return out


def _derivation(result: SourceResult, index: int, model: ModelInfo) -> str:
    """Derivation Description: what was drawn over the source image, by which model."""
    by = f"{model.name} {model.version}".strip()
    if isinstance(result, ClassifiedSource):
        label = result.top(index)[0]
        return f"Class activation map of {label} by {by} drawn over the source image"[:1024]
    return f"Result of {by}"[:1024] + " drawn over the source image"


def _classification_comment(result: SourceResult, index: int) -> str | None:
    """The frame's classification in words (Image Comments), ``None`` for other models."""
    if not isinstance(result, ClassifiedSource):
        return None
    label, score, decision = result.top(index)
    text = f"{label}: {'Present' if decision else 'Absent'}, certainty of finding {100.0 * score:.1f} %"
    if result.threshold is not None:
        text += f" (decision threshold {result.threshold:.4f})"
    return text + "."


def _instance_number(source: Dataset, result: SourceResult, frame: int, series: Sequence[SourceResult] | None) -> int:
    """``10000 x`` the source's number among ``series`` ``+ frame`` (just ``frame`` past the IS range)."""
    numbers = source_numbers(series if series else [SourceResult(source, result.frames)])
    base = numbers.get(str(source.SOPInstanceUID), 1)
    number = base * FRAMES_PER_INSTANCE_NUMBER + min(frame, FRAMES_PER_INSTANCE_NUMBER - 1)
    return frame if number > IS_MAX else number


def _source_image(ref: Dataset, frame: int | None) -> Dataset:
    """The Source Image Sequence item of an overlay: its source (and frame, for a multi-frame source)."""
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept(*_SOURCE_IMAGE_PURPOSE)]
    return item


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
