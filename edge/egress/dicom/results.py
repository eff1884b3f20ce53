"""Inference results as DICOM objects, made with highdicom.

- Segmentation models -> a DICOM **Segmentation** (BINARY, one segment per
  label, referencing the source instances, same study, new series).
  Single-frame sources with a complete patient coordinate system (Frame of
  Reference, Image Position/Orientation (Patient), Pixel Spacing and Slice
  Thickness: CT, MR slices) give one SEG per frame of reference, in that
  frame of reference. Single-frame sources without one (US, CR, DX,
  secondary capture; also an ultrasound image that has a Frame of Reference
  UID and Pixel Spacing but no image plane) give one SEG per instance in
  which every pixel corresponds to a pixel of its source through the
  Derivation Image functional group: no Frame of Reference, no Pixel
  Measures (PS3.3 A.51.5.1: with a Frame of Reference UID the segment would
  have to be placed with Pixel Measures, Plane Position and Plane
  Orientation, which such a source cannot give; the spacing stays with the
  referenced source). A CT/MR slice whose geometry is incomplete (its IOD
  requires a Frame of Reference, so no SEG without one is possible) gets
  its outlines in a TID 1500 SR instead, like a cine. So does a slice whose
  Frame of Reference UID repeats its Study, Series or SOP Instance UID (seen
  in real MR files): a SEG in that frame of reference would repeat the clash.
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
  processed source frame, for viewers that show neither SEG nor SR. It
  references its source image and frame in Source Image Sequence.

Every UID of a result is derived from its inputs (source UIDs, model,
kind), so processing the same instances again after a crash makes the same
objects and a PACS sees a resend, not a duplicate.

**Traceability and order.** Every result carries the appliance's Device
Serial Number (``device_serial_number``; by default derived from a SHA-256
of ``/etc/machine-id``, never the raw id: :func:`default_device_serial`),
and the SR's observer device UID is derived from that serial and the model.
Instance Numbers follow the source instances: a result of one source
instance takes the source's Instance Number (when the sources of a call
have distinct positive ones; else their rank by Instance Number and SOP
Instance UID), a SEG or SR of several sources the smallest of theirs, and an
overlay ``10000 x that number + frame number`` (so overlays of different
instances and frames of one series never share a number and sort like
their sources).

**Research use.** For models whose manifest says ``research_only``,
``NOT FOR CLINICAL USE`` is in every result's Series Description, in the
SEG's Content Description, as a TEXT item (*Comment*, DCM 121106) in a
*Qualitative Evaluations* container (UMLS C0034375) at the root of the TID
1500 SR, and in the SC's Image Comments.

**Malformed source attributes.** Result objects are built from a cleaned
copy of each source's header (:func:`reference_dataset`), never from the
received data set itself, so that a value the libraries refuse neither
stops the result nor appears in a library warning:

- key UIDs (SOP Class/Instance, Study and Series Instance UID) are kept
  exactly: the result always references its source by them;
- identifiers (Patient ID, Issuer of Patient ID, Accession Number, Study
  ID) are kept exactly as sent (a result must match its study in the PACS),
  only a missing one is added empty;
- the Type 2 attributes of the Patient and General Study modules that the
  result IODs require (Patient's Name, Patient ID, Birth Date, Sex, Study
  Date, Study Time, Referring Physician's Name, Study ID, Accession Number)
  are always present: missing ones are added empty, an invalid DA/TM value
  (e.g. ``1941-11-11x``, an impossible date) is left empty, a Patient's Sex
  other than M/F/O is left empty, a person name that breaks the PN rules is
  left empty, and a one-component name (``DOE``) gets the trailing ``^``
  that marks it as a family name (``DOE^``, the same name under PS3.5
  6.2.1.2; highdicom warns about the former);
- a DS value longer than 16 characters (``-16.799999999999997``) is
  written again as the same number in at most 16; an IS value written as a
  decimal integer (``3.0``) as that integer;
- Patient Identity Removed ``YES`` without a De-identification Method or
  its Code Sequence (Type 1C) is dropped: the result cannot invent the
  method, and makes no claim rather than an invalid one;
- any other attribute with an invalid value (DA, TM, DT, UI, AS, CS, DS,
  IS, AE, UR by their PS3.5 rules, text by its maximum length, PN by its
  components) is dropped, and a sequence with such a value anywhere inside
  is dropped as a whole; private attributes, pixel data and overlays are
  not copied;
- a Specific Character Set highdicom refuses (``ISO_IR 999``): text values
  are read as ISO 8859-1 and the result is written in UTF-8
  (``ISO_IR 192``); sequences are then dropped.

The cleaning reads raw values without converting them, so pydicom's own
validation warnings (which quote the value) are not triggered either.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import highdicom as hd
import numpy as np
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM, VALIDATORS, format_number_as_ds

from edge import __version__
from edge.errors import DataError

try:  # what highdicom itself checks Specific Character Set with (0.28)
    from highdicom.valuerep import _check_specific_character_set
except ImportError:  # pragma: no cover - a later highdicom

    def _check_specific_character_set(value: Any) -> Any:
        for term in [value] if isinstance(value, str) else list(value):
            if term:
                hd.SpecificCharacterSetValues(term)
        return value

__all__ = [
    "ModelInfo",
    "SourceResult",
    "series_description",
    "research_statement",
    "default_device_serial",
    "reference_dataset",
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
_FRAMES_PER_INSTANCE_NUMBER = 10000  # overlay Instance Number = source number * this + frame number
_IS_MAX = 2**31 - 1
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
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


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


def research_statement(model: ModelInfo) -> str | None:
    """The research-use statement of ``model``'s results, or ``None`` for a clinical model."""
    if not model.research_only:
        return None
    version = f" {model.version}" if model.version else ""
    return (
        f"{_NOT_CLINICAL}: made by the research model {model.name}{version}; "
        "research use only, not for diagnosis or treatment."
    )


def _content_description(model: ModelInfo) -> str:
    """SEG Content Description (LO, 64 chars)."""
    if model.research_only:
        return f"{_NOT_CLINICAL} - research use only"
    return f"{model.name} {model.version}".strip()[:64]


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


def _device_serial(value: str | None) -> str:
    """``value`` as a valid LO (no backslash or control characters, 64 chars), else the default."""
    text = re.sub(r"[\\\x00-\x1f\x7f]", "", str(value or "")).strip()[:64]
    return text or default_device_serial()


# --------------------------------------------------------------------------- source header cleaning
_KEY_UIDS = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"})
_IDENTIFIERS = frozenset({"PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyID"})
# Type 2 in the Patient and General Study modules of every result IOD; highdicom reads them all.
_TYPE2 = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "ReferringPhysicianName": "PN",
    "StudyID": "SH",
    "AccessionNumber": "SH",
}
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "PN"})
_DATE_CLASSES = {"DA": DA, "TM": TM, "DT": DT}
_CHARSETS_OK: dict[str, bool] = {}


def _skip_tag(tag: BaseTag) -> bool:
    group = tag.group
    return (
        tag.is_private
        or group in (0x0002, 0x7FE0, 0xFFFA, 0xFFFC)
        or (0x6000 <= group <= 0x60FF and tag.element == 0x3000)  # overlay data
        or tag.element == 0  # group lengths
    )


def _vr_of(elem: DataElement | RawDataElement) -> str | None:
    vr = elem.VR
    if vr is None:
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    return str(vr)


def _raw_strings(raw: RawDataElement) -> list[str]:
    """The values of an ASCII-VR raw element as pydicom would split them, without its conversion (and warnings)."""
    data = raw.value or b""
    text = bytes(data).decode("latin-1") if isinstance(data, (bytes, bytearray)) else str(data)
    text = text.rstrip("\x00 ")
    return text.split("\\") if text else []


def _strings(ds: Dataset, keyword: str) -> list[str] | None:
    """The values of an ASCII-VR attribute as strings, without conversion; ``None`` when absent."""
    if keyword not in ds:
        return None
    elem = ds.get_item(keyword)
    if isinstance(elem, RawDataElement):
        return _raw_strings(elem)
    return [str(v) for v in _values(elem.value)]


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _valid_value(vr: str, value: Any) -> bool:
    """Whether one value is valid for ``vr`` (PS3.5 rules as pydicom knows them), without warnings."""
    if isinstance(value, (datetime.date, datetime.time)):
        return True  # already a date/time object
    if vr in _ASCII_VRS:
        text = str(value)
        if text.strip(" \x00") == "":
            return True
        validator = VALIDATORS.get(vr)
        if validator is not None and not validator(vr, text)[0]:
            return False
        if vr in _DATE_CLASSES:
            if vr != "DT" and "-" in text:  # a range is a query, not a value
                return False
            try:
                _DATE_CLASSES[vr](text)
            except (ValueError, TypeError, OverflowError):
                return False
        return True
    if vr == "PN":
        groups = str(value).split("=")
        if len(groups) > 3:
            return False
        for g in groups:
            comps = g.split("^")
            if len(comps) > 5 or any(len(c) > 64 for c in comps):
                return False
        return True
    if vr in _TEXT_VRS:
        text = str(value)
        if "\x00" in text:
            return False
        validator = VALIDATORS.get(vr)
        return validator is None or bool(validator(vr, text)[0])
    return True


def _element_values(ds: Dataset, elem: DataElement | RawDataElement, vr: str, latin1: bool = False) -> list[Any]:
    """The values of an element; raw text is decoded by pydicom with the data set's character set,
    or (``latin1``, for a character set highdicom refuses) as ISO 8859-1, which never fails."""
    if isinstance(elem, RawDataElement):
        if vr in _ASCII_VRS:
            return _raw_strings(elem)
        if latin1 and vr in _TEXT_VRS:
            data = elem.value or b""
            text = bytes(data).decode("latin-1") if isinstance(data, (bytes, bytearray)) else str(data)
            text = text.rstrip("\x00 ")
            if not text:
                return []
            return [text] if vr in ("LT", "ST", "UT") else text.split("\\")
        elem = ds[elem.tag]
    return _values(elem.value)


def _element_ok(ds: Dataset, elem: DataElement | RawDataElement, depth: int = 0, latin1: bool = False) -> bool:
    """Whether an element (and, for a sequence, everything in it) has valid values."""
    vr = _vr_of(elem)
    if vr is None:
        return True
    if vr == "SQ":
        if depth > 16:
            return False
        seq = ds[elem.tag].value if isinstance(elem, RawDataElement) else elem.value
        for item in seq or []:
            for tag in list(item.keys()):
                if not _element_ok(item, item.get_item(tag), depth + 1):
                    return False
        return True
    if vr not in _ASCII_VRS and vr not in _TEXT_VRS:
        return True
    try:
        return all(_valid_value(vr, v) for v in _element_values(ds, elem, vr, latin1))
    except Exception:  # noqa: BLE001 - undecodable is invalid
        return False


def _charset_ok(value: Any) -> bool:
    """Whether highdicom accepts a Specific Character Set value (cached per value)."""
    terms = [str(v).strip() for v in _values(value)]
    key = "\\".join(terms)
    if key not in _CHARSETS_OK:
        try:
            _check_specific_character_set(terms if len(terms) > 1 else (terms[0] if terms else "ISO_IR 6"))
            _CHARSETS_OK[key] = True
        except Exception:  # noqa: BLE001 - anything highdicom refuses
            _CHARSETS_OK[key] = False
    return _CHARSETS_OK[key]


def _repair_type2(keyword: str, vr: str, values: list[Any]) -> Any:
    """A valid value for a Type 2 attribute: the value, a repair, or empty."""
    if keyword in _IDENTIFIERS:
        return None  # never altered (see the module docstring)
    if keyword == "PatientSex":
        text = str(values[0]).strip().upper() if values else ""
        return text if text in ("M", "F", "O") else ""
    if vr == "PN":
        if len(values) != 1 or not _valid_value("PN", values[0]):
            return ""
        text = str(values[0])
        if text and "^" not in text:
            groups = text.split("=")
            i = next((k for k, g in enumerate(groups) if g), 0)
            groups[i] += "^"
            text = "=".join(groups)
        return text
    if not all(_valid_value(vr, v) for v in values) or len(values) > 1:
        return ""
    return None


def _repair_number(vr: str, values: list[Any]) -> Any:
    """DS values re-formatted to at most 16 characters, IS values as integers; ``None`` if not numbers."""
    out: list[Any] = []
    for v in values:
        try:
            x = float(str(v).strip())
        except ValueError:
            return None
        if not math.isfinite(x):
            return None
        if vr == "DS":
            out.append(format_number_as_ds(x))
        elif x.is_integer() and -(2**31) <= x <= _IS_MAX:
            out.append(int(x))
        else:
            return None
    return out[0] if len(out) == 1 else out


def reference_dataset(ds: Dataset, *, keep_geometry: bool = True) -> Dataset:
    """A cleaned copy of a source header for building results (see the module docstring).

    With ``keep_geometry=False`` the patient coordinate system (Frame of
    Reference, image plane, pixel measures) is left out: what a SEG of an
    image without a complete image plane must not claim.
    """
    out = Dataset()
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    charset = _strings(ds, "SpecificCharacterSet")
    charset_ok = not charset or _charset_ok(charset)
    if not charset_ok:
        # highdicom refuses the term: text is read as ISO 8859-1 and written as UTF-8.
        out.SpecificCharacterSet = "ISO_IR 192"
    latin1 = not charset_ok
    for tag in list(ds.keys()):
        tag = BaseTag(tag)
        if _skip_tag(tag) or (tag == 0x00080005 and latin1):
            continue
        elem = ds.get_item(tag)
        keyword = keyword_for_tag(tag)
        vr = _vr_of(elem)
        if keyword in _KEY_UIDS or (keyword in _IDENTIFIERS and not latin1):
            out[tag] = elem  # never altered
            continue
        if vr is None or (vr == "SQ" and latin1):
            continue
        if keyword in _TYPE2:
            try:
                values = _element_values(ds, elem, vr, latin1)
                fixed = _repair_type2(keyword, vr, values)
            except Exception:  # noqa: BLE001 - undecodable
                fixed = ""
            if fixed is not None:
                out.add_new(tag, _TYPE2[keyword], fixed)
                continue
        elif vr in ("DS", "IS") and not _element_ok(ds, elem):
            number = _repair_number(vr, _element_values(ds, elem, vr))
            if number is not None:
                out.add_new(tag, vr, number)
            continue
        elif not _element_ok(ds, elem, latin1=latin1):
            continue
        if latin1 and vr in _TEXT_VRS:
            values = _element_values(ds, elem, vr, latin1)
            out.add_new(tag, vr, (values[0] if len(values) == 1 else values) if values else "")
        else:
            out[tag] = elem
    for keyword, vr in _TYPE2.items():
        if keyword not in out:
            out.add_new(keyword, vr, "")
    if (
        str(out.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
        and "DeidentificationMethod" not in out
        and "DeidentificationMethodCodeSequence" not in out
    ):
        # "YES" requires a De-identification Method (Type 1C) the source did not give; the
        # result cannot invent one, so it makes no claim either way (the attribute is Type 3).
        del out["PatientIdentityRemoved"]
    if not keep_geometry:
        for keyword in (
            "FrameOfReferenceUID",
            "PositionReferenceIndicator",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "SpacingBetweenSlices",
            "SliceLocation",
        ):
            if keyword in out:
                del out[keyword]
    return out


def _floats(ds: Dataset, keyword: str, n: int) -> list[float] | None:
    """``n`` finite numbers of a DS attribute, else ``None`` (no conversion warnings)."""
    try:
        out = [float(v) for v in _strings(ds, keyword) or []]
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _int_of(ds: Dataset, keyword: str, default: int) -> int:
    """An IS attribute's (first) value, else ``default`` (no conversion warnings)."""
    values = _strings(ds, keyword)
    try:
        return int(str(values[0]).strip()) if values else default
    except (TypeError, ValueError):
        return default


def _has_patient_geometry(ds: Dataset) -> bool:
    """Whether a single-frame image places its pixels in a patient coordinate system, completely.

    Frame of Reference UID (valid), Image Position (3) and Orientation (6)
    (Patient), Pixel Spacing (2, positive) and Slice Thickness (positive):
    everything highdicom needs for Pixel Measures, Plane Position and Plane
    Orientation, and needs again to read the SEG back.
    """
    uid = _strings(ds, "FrameOfReferenceUID")
    if not uid or len(uid) != 1 or not uid[0] or not _valid_value("UI", uid[0]):
        return False
    if uid[0] in {str(ds.get(k, "")) for k in _KEY_UIDS}:
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


def _patient_orientation(ds: Dataset) -> list[str]:
    """The source's Patient Orientation (two CS values), else one from its image plane, else empty."""
    values = [v.strip() for v in _strings(ds, "PatientOrientation") or []]
    if values:
        if len(values) == 2 and all(re.fullmatch(r"[A-Z]{1,16}", v) for v in values):
            return values
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if iop is not None:
        orientation = _orientation_from_iop(iop)
        if all(orientation):
            return orientation
    return []


def _source_numbers(sources: Sequence[SourceResult]) -> dict[str, int]:
    """Instance Number of the result of each source (by SOP Instance UID): see the module docstring."""
    uids = [str(s.dataset.SOPInstanceUID) for s in sources]
    nums = [_int_of(s.dataset, "InstanceNumber", 0) for s in sources]
    if all(0 < n <= _IS_MAX // _FRAMES_PER_INSTANCE_NUMBER for n in nums) and len(set(nums)) == len(nums):
        return dict(zip(uids, nums))
    order = sorted(range(len(sources)), key=lambda i: (nums[i] <= 0, nums[i], uids[i]))
    return {uids[i]: rank for rank, i in enumerate(order, start=1)}


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
def _equipment(model: ModelInfo, serial: str) -> dict[str, Any]:
    return dict(
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=model.name[:64] or "medge",
        software_versions=f"medge {__version__}",
        device_serial_number=serial,
    )


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
    geometry = all(_has_patient_geometry(s.dataset) for s in sources)
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
            segmented_property_type=_label_code(label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model),
        )
        for i, label in enumerate(model.labels[:n_labels] or ("finding",))
    ]
    first = refs[0]
    src_uids = sorted(str(r.SOPInstanceUID) for r in refs)
    if instance_number is None:
        instance_number = _source_numbers(sources)[str(sources[0].dataset.SOPInstanceUID)]
    pixel_array = stack if n_labels > 1 else stack.astype(bool)
    seg = hd.seg.Segmentation(
        source_images=refs,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(first.SeriesInstanceUID, model.name, "SEG", "series"),
        series_number=_SERIES_NUMBER["SEG"],
        sop_instance_uid=_uid(model.name, model.version, "SEG", *src_uids),
        instance_number=int(instance_number),
        series_description=series_description(model, "SEG"),
        content_description=_content_description(model),
        omit_empty_frames=False,
        **_equipment(model, _device_serial(device_serial_number)),
    )
    if "FrameOfReferenceUID" not in seg:
        # General Image Patient Orientation: Type 2C when there is no image plane; empty when unknown.
        seg.PatientOrientation = _patient_orientation(first)
    return seg


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


# --------------------------------------------------------------------------- SR
def _roi_groups(sources: Sequence[SourceResult], refs: Sequence[Dataset], model: ModelInfo) -> list[Any]:
    groups: list[Any] = []
    for src, ds in zip(sources, refs):
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
            groups.append(_absent_group(src, ds, model))
    return groups


def _absent_group(src: SourceResult, ds: Dataset, model: ModelInfo) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group saying the model found nothing on this source (and its processed frames)."""
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
    still lists the evaluated images in its image library.
    ``instance_number`` defaults to the smallest of the sources' (see the
    module docstring).
    """
    if not sources:
        raise DataError("No source instances to make an SR of.")
    refs = [reference_dataset(s.dataset) for s in sources]
    first = refs[0]
    serial = _device_serial(device_serial_number)
    if instance_number is None:
        instance_number = min(_source_numbers(sources).values())
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("medge-device", serial, model.name),
            name="medge",
            manufacturer_name=_MANUFACTURER,
            model_name=model.name[:64] or "medge",
            serial_number=serial,
        ),
    )
    groups = _roi_groups(sources, refs, model)
    kwargs = dict(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_procedure(str(first.get("Modality", "") or "")),
        imaging_measurements=groups,
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
    src_uids = sorted(str(r.SOPInstanceUID) for r in refs)
    return hd.sr.ComprehensiveSR(
        evidence=refs,
        content=report,
        series_instance_uid=_uid(first.SeriesInstanceUID, model.name, "SR", "series"),
        series_number=_SERIES_NUMBER["SR"],
        sop_instance_uid=_uid(model.name, model.version, "SR", *src_uids),
        instance_number=int(instance_number),
        is_complete=True,
        series_description=series_description(model, "SR"),
        **_equipment(model, serial),
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
    the result series, as given to :func:`build_results`; default: the
    source's own Instance Number), unless ``instance_number`` is given.

    General Series Laterality (Type 2C) follows the source: ``R``/``L`` when
    the source says so; absent when its Body Part Examined is an unpaired
    structure; otherwise (a paired or unnamed body part of unknown side)
    present and empty, which the standard allows when the side is unknown.
    Patient Orientation is the source's, else derived from its Image
    Orientation (Patient), else empty (Type 2C, unknown).
    """
    frame = int(result.frames[index])
    mask = result.masks[index] if result.masks is not None else None
    boxes = result.boxes[index] if index < len(result.boxes) else []
    rgb = _draw_overlay(frame_pixels, mask, boxes)
    ref = reference_dataset(source)
    laterality, laterality_applies = _laterality(ref)
    if instance_number is None:
        numbers = _source_numbers(series if series else [SourceResult(source, result.frames)])
        base = numbers.get(str(source.SOPInstanceUID), 1)
        instance_number = base * _FRAMES_PER_INSTANCE_NUMBER + min(frame, _FRAMES_PER_INSTANCE_NUMBER - 1)
        if instance_number > _IS_MAX:
            instance_number = frame
    statement = research_statement(model)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # placeholder required by highdicom; replaced below
        series_instance_uid=_uid(ref.SeriesInstanceUID, model.name, "SC", "series"),
        series_number=_SERIES_NUMBER["SC"],
        sop_instance_uid=_uid(model.name, model.version, "SC", ref.SOPInstanceUID, frame),
        instance_number=int(instance_number),
        series_description=series_description(model, "overlay"),
        laterality=hd.LateralityValues(laterality) if laterality else None,
        **_equipment(model, _device_serial(device_serial_number)),
    )
    sc.BurnedInAnnotation = "YES"  # the result is drawn into the pixels
    sc.PatientOrientation = _patient_orientation(ref)  # Type 2C: empty when unknown
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if result.multiframe:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept(*_SOURCE_IMAGE_PURPOSE)]
    sc.SourceImageSequence = [item]
    sc.DerivationDescription = f"Result of {model.name} {model.version}".strip()[:1024] + " drawn over the source image"
    if statement:
        sc.ImageComments = statement
    if ref.get("BodyPartExamined", ""):
        sc.BodyPartExamined = ref.BodyPartExamined  # what the Laterality condition is judged by
    if laterality_applies and "Laterality" not in sc:
        # Type 2C, required for a paired (or unnamed) body part: empty = side unknown. highdicom
        # has no way to write an empty value (its None omits the attribute).
        sc.Laterality = ""
    elif not laterality_applies and "Laterality" in sc:
        del sc.Laterality
    return sc


# --------------------------------------------------------------------------- dispatch
def build_results(
    sources: Sequence[SourceResult], model: ModelInfo, *, device_serial_number: str | None = None
) -> list[Dataset]:
    """The result objects for one completed series (see the module docstring).

    ``device_serial_number`` is the appliance's ``[dicom] device_serial_number``
    (default: :func:`default_device_serial`).

    Returns
    -------
    list of pydicom.dataset.Dataset
        SEG(s) for segmentation of single-frame sources, else one SR.
    """
    if not sources:
        return []
    serial = _device_serial(device_serial_number)
    numbers = _source_numbers(sources)

    def number(group: Sequence[SourceResult]) -> int:
        return min(numbers[str(s.dataset.SOPInstanceUID)] for s in group)

    if model.task == "detection":
        return [make_findings_sr(sources, model, device_serial_number=serial, instance_number=number(sources))]
    single = [s for s in sources if not s.multiframe]
    to_sr = [s for s in sources if s.multiframe]
    out: list[Dataset] = []
    if single:
        # Slices with a complete patient coordinate system share one SEG per frame of reference.
        planar = [s for s in single if _has_patient_geometry(s.dataset)]
        alone = [s for s in single if not _has_patient_geometry(s.dataset)]
        by_for: dict[str, list[SourceResult]] = {}
        for s in planar:
            by_for.setdefault(str(s.dataset.FrameOfReferenceUID), []).append(s)
        for group in by_for.values():
            group.sort(key=lambda s: (numbers[str(s.dataset.SOPInstanceUID)], str(s.dataset.SOPInstanceUID)))
            if len(group) == 1:
                alone.extend(group)
                continue
            try:
                out.append(make_segmentation(group, model, device_serial_number=serial, instance_number=number(group)))
            except (ValueError, AttributeError, TypeError) as exc:  # e.g. inconsistent geometry across slices
                _log.warning(
                    "One SEG per instance for a series highdicom cannot segment as a whole (%s).", type(exc).__name__
                )
                alone.extend(group)
        alone.sort(key=lambda s: (numbers[str(s.dataset.SOPInstanceUID)], str(s.dataset.SOPInstanceUID)))
        for s in alone:
            try:
                out.append(make_segmentation([s], model, device_serial_number=serial, instance_number=number([s])))
            except (ValueError, AttributeError, TypeError) as exc:
                # e.g. a CT/MR slice with an incomplete image plane: its IOD needs a Frame of
                # Reference, so its outlines go into the SR, as for a cine.
                _log.warning("Outlines in an SR for an instance highdicom cannot segment (%s).", type(exc).__name__)
                to_sr.append(s)
    if to_sr:
        out.append(make_findings_sr(to_sr, model, device_serial_number=serial, instance_number=number(to_sr)))
    return out
