"""What every result object shares: the model, the sources, their UIDs, the appliance.

- :class:`ModelInfo` and :class:`SourceResult`: what a result says about
  its model, and one source instance with the results of its processed
  frames;
- UIDs: every UID of a result is derived from its inputs by
  :func:`derived_uid`: source UIDs, kind, the model and its configuration
  (:func:`model_key`: name, version, decision threshold, serial) and, for
  the SOP Instance UID, what the model said (:func:`results_digest`). So
  processing the same instances again after a crash makes the same objects
  and a PACS sees a resend, not a duplicate, while a result with other
  content (another threshold, model version or precision) never reuses a
  UID;
- the appliance's identity in every result: Manufacturer, model name,
  software version and Device Serial Number (:func:`equipment`,
  :func:`default_device_serial`);
- the research-use statement (:func:`series_description`,
  :func:`research_statement`);
- Instance Numbers of results after their sources (:func:`source_numbers`)
  and the source's geometry (:func:`has_patient_geometry`,
  :func:`patient_orientation`).

The cleaned copy of a source header every result is built from is made in
:mod:`edge.egress.dicom.reference` (:func:`~edge.egress.dicom.reference.reference_dataset`).

**Traceability.** Every result carries the appliance's Device Serial Number
(``device_serial_number``; by default derived from a SHA-256 of
``/etc/machine-id``, never the raw id: :func:`default_device_serial`).

**Research use.** For models whose manifest says ``research_only``,
``NOT FOR CLINICAL USE`` is in every result's Series Description (and, per
object, in the places :mod:`~edge.egress.dicom.seg`,
:mod:`~edge.egress.dicom.sr` and :mod:`~edge.egress.dicom.sc` name).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from edge import __version__
from edge.egress.dicom.reference import IS_MAX, KEY_UIDS, attribute_strings, valid_value  # IS_MAX: part of this API too

__all__ = [
    "MANUFACTURER",
    "NOT_CLINICAL",
    "SERIES_NUMBER",
    "series_uid",
    "IS_MAX",
    "FRAMES_PER_INSTANCE_NUMBER",
    "SINGLE_FRAME_SOP_CLASSES",
    "ModelInfo",
    "SourceResult",
    "derived_uid",
    "model_key",
    "results_digest",
    "series_description",
    "research_statement",
    "label_code",
    "default_device_serial",
    "device_serial",
    "equipment",
    "has_patient_geometry",
    "patient_orientation",
    "source_numbers",
]

MANUFACTURER = "medge"
SERIES_NUMBER = {"SEG": 9901, "SR": 9902, "SC": 9903}
NOT_CLINICAL = "NOT FOR CLINICAL USE"
FRAMES_PER_INSTANCE_NUMBER = 10000  # overlay Instance Number = source number * this + frame number
#: Image Storage SOP classes whose IODs have no Multi-frame Module (PS3.3 A): CR, DX, MG, IO (for
#: presentation and processing), CT, MR, US (and its retired class), Secondary Capture, PET, and the
#: single-frame VL images. A reference to one of these shall not have a Referenced Frame Number.
SINGLE_FRAME_SOP_CLASSES = frozenset(
    "1.2.840.10008.5.1.4.1.1." + suffix
    for suffix in (
        "1 1.1 1.1.1 1.2 1.2.1 1.3 1.3.1 2 4 6 6.1 7 128 77.1.1 77.1.2 77.1.3 77.1.4".split()
    )
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
        return _int_of(self.dataset, "NumberOfFrames", 1) > 1

    @property
    def frame_references(self) -> bool:
        """Whether a reference to the source names frames (Referenced Frame Number).

        Only for a multi-frame source of a multi-frame SOP class: a reference
        to an instance of a single-frame class (CT, CR, Secondary Capture)
        shall not name a frame, even when the instance carries several.
        """
        return self.multiframe and str(self.dataset.get("SOPClassUID", "")) not in SINGLE_FRAME_SOP_CLASSES


def derived_uid(*parts: object) -> str:
    """A UID derived from ``parts`` (the same parts give the same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def series_uid(ds: Dataset, *parts: object) -> str:
    """A result series' UID: the source series, ``parts`` and the patient (one result series, one patient).

    The pipeline gives each patient of a source series its own result
    (a series naming two patients is the sender's error); derived from the
    source series alone, their result series would share one UID. The
    patient's identifiers enter only the UID's hash.
    """
    patient = [str(ds.get(k, "")) for k in ("PatientID", "IssuerOfPatientID", "PatientName")]
    return derived_uid(ds.SeriesInstanceUID, *parts, hashlib.sha256("\0".join(patient).encode("utf-8")).hexdigest())


def model_key(model: ModelInfo, serial: str, sources: Sequence[SourceResult] = ()) -> tuple[str, ...]:
    """What of the model and its configuration a result's content depends on, for its UIDs.

    Name, version, task, labels, research flag, the appliance's serial and
    the decision threshold in use (the model's and the sources'): results
    made with another threshold say something else, so they get other UIDs.

    Examples
    --------
    >>> model_key(ModelInfo("m", "1", "detection", ("nodule",), False), "S1")
    ('m', '1', 'detection', 'nodule', 'False', 'S1', 'threshold=')
    """
    thresholds = {getattr(model, "threshold", None)} | {getattr(s, "threshold", None) for s in sources}
    stated = ",".join(sorted(repr(float(t)) for t in thresholds if t is not None))
    return (
        model.name, model.version, model.task, "\\".join(model.labels), str(model.research_only), serial,
        f"threshold={stated}",
    )


def results_digest(sources: Sequence[SourceResult]) -> str:
    """A SHA-256 over what the model said about ``sources`` (frames, masks, boxes, classes, decisions).

    Part of a result's SOP Instance UID: the same results give the same UID
    (a resend after a crash), other results (another precision, runtime or
    threshold) another one, never one UID for two contents.
    """
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.dataset.get('SOPInstanceUID', '')}|{list(map(int, s.frames))}|".encode())
        if s.masks is not None:
            masks = np.ascontiguousarray(s.masks)
            h.update(f"{masks.shape}{masks.dtype}".encode())
            h.update(masks.tobytes())
        extra = {k: getattr(s, k, None) for k in ("classes", "decisions", "threshold")}
        h.update(json.dumps([s.boxes, extra], sort_keys=True, default=_plain).encode())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """A numpy scalar or array as the Python value JSON writes the same way as after a reload."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def series_description(model: ModelInfo, kind: str) -> str:
    """``<model> <kind>`` plus ``NOT FOR CLINICAL USE`` for research models (64 chars max)."""
    text = f"{model.name} {kind}"
    if model.research_only:
        text = f"{text} {NOT_CLINICAL}"
    if len(text) > 64:
        keep = 64 - (len(NOT_CLINICAL) + 1 if model.research_only else 0)
        text = f"{model.name} {kind}"[:keep].rstrip() + (f" {NOT_CLINICAL}" if model.research_only else "")
    return text


def research_statement(model: ModelInfo) -> str | None:
    """The research-use statement of ``model``'s results, or ``None`` for a clinical model."""
    if not model.research_only:
        return None
    version = f" {model.version}" if model.version else ""
    return (
        f"{NOT_CLINICAL}: made by the research model {model.name}{version}; "
        "research use only, not for diagnosis or treatment."
    )


def label_code(label: str) -> Code:
    """The SNOMED CT concept of a model label (lesion, nodule, mass), else *Finding*."""
    known = {"lesion": codes.SCT.Lesion, "nodule": codes.SCT.Nodule, "mass": codes.SCT.Mass}
    return known.get(label.lower(), codes.SCT.Finding)


# --------------------------------------------------------------------------- appliance identity
@functools.lru_cache(maxsize=1)
def default_device_serial() -> str:
    """A Device Serial Number that is stable per machine and reveals nothing about it.

    The first 16 hex digits of a SHA-256 over ``/etc/machine-id`` (or
    ``/var/lib/dbus/machine-id``, else the host name); the raw id never
    leaves the machine.
    """
    seed = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            seed = Path(path).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if seed:
            break
    if not seed:
        seed = "host:" + (socket.gethostname() or "medge")
    return hashlib.sha256(f"medge-device-serial:{seed}".encode()).hexdigest()[:16].upper()


def device_serial(value: str | None) -> str:
    """``value`` as a valid LO (no backslash or control characters, 64 chars), else the default."""
    text = re.sub(r"[\\\x00-\x1f\x7f]", "", str(value or "")).strip()[:64]
    return text or default_device_serial()


def equipment(model: ModelInfo, serial: str) -> dict[str, Any]:
    """The General/Enhanced Equipment arguments of every highdicom result constructor."""
    return dict(
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name[:64] or "medge",
        software_versions=f"medge {__version__}",
        device_serial_number=serial,
    )


# --------------------------------------------------------------------------- source geometry and numbers
def _floats(ds: Dataset, keyword: str, n: int) -> list[float] | None:
    """``n`` finite numbers of a DS attribute, else ``None`` (no conversion warnings)."""
    try:
        out = [float(v) for v in attribute_strings(ds, keyword) or []]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _int_of(ds: Dataset, keyword: str, default: int) -> int:
    """An IS attribute's (first) value, else ``default`` (no conversion warnings)."""
    values = attribute_strings(ds, keyword)
    try:
        return int(str(values[0]).strip()) if values else default
    except (TypeError, ValueError):
        return default


def has_patient_geometry(ds: Dataset) -> bool:
    """Whether a single-frame image places its pixels in a patient coordinate system, completely.

    Frame of Reference UID (valid), Image Position (3) and Orientation (6)
    (Patient), Pixel Spacing (2, positive) and Slice Thickness (positive):
    everything highdicom needs for Pixel Measures, Plane Position and Plane
    Orientation, and needs again to read the SEG back.
    """
    uid = attribute_strings(ds, "FrameOfReferenceUID")
    if not uid or len(uid) != 1 or not uid[0] or not valid_value("UI", uid[0]):
        return False
    if uid[0] in {str(ds.get(k, "")) for k in KEY_UIDS}:
        # One UID for two things (seen: Frame of Reference UID = Study Instance UID). A SEG in
        # that frame of reference repeats the clash (a dciodvfy error), so it is not used.
        return False
    spacing = _floats(ds, "PixelSpacing", 2)
    thickness = _floats(ds, "SliceThickness", 1)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    return (
        _floats(ds, "ImagePositionPatient", 3) is not None
        and iop is not None
        and abs(float(np.linalg.norm(iop[:3])) - 1.0) < 0.01
        and abs(float(np.linalg.norm(iop[3:])) - 1.0) < 0.01
        and spacing is not None
        and min(spacing) > 0
        and thickness is not None
        and thickness[0] > 0
    )


_ORIENTATION_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def _orientation_from_iop(iop: Sequence[float]) -> list[str]:
    """Patient Orientation from Image Orientation (Patient): main direction first, at most 3 letters."""

    def letters(v: Sequence[float]) -> str:
        text = ""
        for i in sorted(range(3), key=lambda k: -abs(v[k])):
            if abs(v[i]) > 1e-4:
                text += _ORIENTATION_LETTERS[i][0 if v[i] > 0 else 1]
        return text[:3]

    return [letters(iop[:3]), letters(iop[3:])]


def patient_orientation(ds: Dataset) -> list[str]:
    """The source's Patient Orientation (two CS values), else one from its image plane, else empty."""
    values = [v.strip() for v in attribute_strings(ds, "PatientOrientation") or []]
    if values:
        if len(values) == 2 and all(re.fullmatch(r"[A-Z]{1,16}", v) for v in values):
            return values
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if iop is not None:
        orientation = _orientation_from_iop(iop)
        if all(orientation):
            return orientation
    return []


def source_numbers(sources: Sequence[SourceResult]) -> dict[str, int]:
    """Instance Number of the result of each source (by SOP Instance UID): see :mod:`edge.egress.dicom.results`."""
    uids = [str(s.dataset.SOPInstanceUID) for s in sources]
    nums = [_int_of(s.dataset, "InstanceNumber", 0) for s in sources]
    if all(0 < n <= IS_MAX // FRAMES_PER_INSTANCE_NUMBER for n in nums) and len(set(nums)) == len(nums):
        return dict(zip(uids, nums))
    order = sorted(range(len(sources)), key=lambda i: (nums[i] <= 0, nums[i], uids[i]))
    return {uids[i]: rank for rank, i in enumerate(order, start=1)}
