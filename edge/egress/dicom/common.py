"""What every result object shares: the model, the sources, their cleaned headers, the appliance.

- :class:`ModelInfo` and :class:`SourceResult`: what a result says about
  its model, and one source instance with the results of its processed
  frames;
- UIDs: every UID of a result is derived from its inputs (source UIDs,
  model, kind) by :func:`derived_uid`, so processing the same instances
  again after a crash makes the same objects and a PACS sees a resend, not
  a duplicate;
- the appliance's identity in every result: Manufacturer, model name,
  software version and Device Serial Number (:func:`equipment`,
  :func:`default_device_serial`);
- the research-use statement (:func:`series_description`,
  :func:`research_statement`);
- Instance Numbers of results after their sources (:func:`source_numbers`)
  and the source's geometry (:func:`has_patient_geometry`,
  :func:`patient_orientation`);
- the cleaned copy of a source header every result is built from
  (:func:`reference_dataset`).

**Traceability.** Every result carries the appliance's Device Serial Number
(``device_serial_number``; by default derived from a SHA-256 of
``/etc/machine-id``, never the raw id: :func:`default_device_serial`).

**Research use.** For models whose manifest says ``research_only``,
``NOT FOR CLINICAL USE`` is in every result's Series Description (and, per
object, in the places :mod:`~edge.egress.dicom.seg`,
:mod:`~edge.egress.dicom.sr` and :mod:`~edge.egress.dicom.sc` name).

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

try:  # what highdicom itself checks Specific Character Set with (0.28)
    from highdicom.valuerep import _check_specific_character_set
except ImportError:  # pragma: no cover - a later highdicom

    def _check_specific_character_set(value: Any) -> Any:
        for term in [value] if isinstance(value, str) else list(value):
            if term:
                hd.SpecificCharacterSetValues(term)
        return value

__all__ = [
    "MANUFACTURER",
    "NOT_CLINICAL",
    "SERIES_NUMBER",
    "IS_MAX",
    "FRAMES_PER_INSTANCE_NUMBER",
    "ModelInfo",
    "SourceResult",
    "derived_uid",
    "series_description",
    "research_statement",
    "label_code",
    "default_device_serial",
    "device_serial",
    "equipment",
    "reference_dataset",
    "has_patient_geometry",
    "patient_orientation",
    "source_numbers",
]

MANUFACTURER = "medge"
SERIES_NUMBER = {"SEG": 9901, "SR": 9902, "SC": 9903}
NOT_CLINICAL = "NOT FOR CLINICAL USE"
FRAMES_PER_INSTANCE_NUMBER = 10000  # overlay Instance Number = source number * this + frame number
IS_MAX = 2**31 - 1


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


def derived_uid(*parts: object) -> str:
    """A UID derived from ``parts`` (the same parts give the same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


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
        elif x.is_integer() and -(2**31) <= x <= IS_MAX:
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


def has_patient_geometry(ds: Dataset) -> bool:
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


def patient_orientation(ds: Dataset) -> list[str]:
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


def source_numbers(sources: Sequence[SourceResult]) -> dict[str, int]:
    """Instance Number of the result of each source (by SOP Instance UID): see :mod:`edge.egress.dicom.results`."""
    uids = [str(s.dataset.SOPInstanceUID) for s in sources]
    nums = [_int_of(s.dataset, "InstanceNumber", 0) for s in sources]
    if all(0 < n <= IS_MAX // FRAMES_PER_INSTANCE_NUMBER for n in nums) and len(set(nums)) == len(nums):
        return dict(zip(uids, nums))
    order = sorted(range(len(sources)), key=lambda i: (nums[i] <= 0, nums[i], uids[i]))
    return {uids[i]: rank for rank, i in enumerate(order, start=1)}
