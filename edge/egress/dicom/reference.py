"""What of a source's header a result may copy, validated and repaired.

Result objects are built from :func:`reference_dataset`, a cleaned copy of
each source's header, never from the received data set itself, so that a
value the libraries refuse neither stops the result nor appears in a library
warning. :func:`attribute_strings` and :func:`valid_value` read and check
single attributes the same way for the rest of :mod:`edge.egress.dicom`.

**Malformed source attributes** are handled so:

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
import math
from typing import Any

import highdicom as hd
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import DA, DT, TM, VALIDATORS, format_number_as_ds

try:  # what highdicom itself checks Specific Character Set with (0.28)
    from highdicom.valuerep import _check_specific_character_set
except ImportError:  # pragma: no cover - a later highdicom

    def _check_specific_character_set(value: Any) -> Any:
        for term in [value] if isinstance(value, str) else list(value):
            if term:
                hd.SpecificCharacterSetValues(term)
        return value

__all__ = ["IS_MAX", "KEY_UIDS", "attribute_strings", "reference_dataset", "valid_value"]

IS_MAX = 2**31 - 1  # the largest IS (Integer String) value, PS3.5 6.2

#: Copied exactly: a result always references its source by them.
KEY_UIDS = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"})
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


def attribute_strings(ds: Dataset, keyword: str) -> list[str] | None:
    """The values of an ASCII-VR attribute as strings, without conversion; ``None`` when absent.

    Reading the raw value this way triggers none of pydicom's conversion
    warnings (which would quote the value).

    Examples
    --------
    >>> ds = Dataset()
    >>> ds.PixelSpacing = ["0.5", "0.5"]
    >>> attribute_strings(ds, "PixelSpacing"), attribute_strings(ds, "SliceThickness")
    (['0.5', '0.5'], None)
    """
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


def valid_value(vr: str, value: Any) -> bool:
    """Whether one value is valid for ``vr`` (PS3.5 rules as pydicom knows them), without warnings.

    Examples
    --------
    >>> valid_value("DA", "19411111"), valid_value("DA", "1941-11-11x"), valid_value("UI", "1.2.3")
    (True, False, True)
    """
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
        return all(valid_value(vr, v) for v in _element_values(ds, elem, vr, latin1))
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
        if len(values) != 1 or not valid_value("PN", values[0]):
            return ""
        text = str(values[0])
        if text and "^" not in text:
            groups = text.split("=")
            i = next((k for k, g in enumerate(groups) if g), 0)
            groups[i] += "^"
            text = "=".join(groups)
        return text
    if not all(valid_value(vr, v) for v in values) or len(values) > 1:
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



_GEOMETRY = (
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
)


def reference_dataset(ds: Dataset, *, keep_geometry: bool = True) -> Dataset:
    """A cleaned copy of a source header for building results (see the module docstring).

    With ``keep_geometry=False`` the patient coordinate system (Frame of
    Reference, image plane, pixel measures) is left out: what a SEG of an
    image without a complete image plane must not claim.
    """
    out = Dataset()
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    charset = attribute_strings(ds, "SpecificCharacterSet")
    charset_ok = not charset or _charset_ok(charset)
    if not charset_ok:
        # highdicom refuses the term: text is read as ISO 8859-1 and written as UTF-8.
        out.SpecificCharacterSet = "ISO_IR 192"
    latin1 = not charset_ok
    for tag in list(ds.keys()):
        tag = BaseTag(tag)
        if _skip_tag(tag) or (tag == 0x00080005 and latin1):
            continue
        _copy_element(ds, tag, out, latin1)
    _complete(out, keep_geometry)
    return out


def _copy_element(ds: Dataset, tag: BaseTag, out: Dataset, latin1: bool) -> None:
    """Copy one element of ``ds`` into ``out`` as it is, repaired, or not at all."""
    elem = ds.get_item(tag)
    keyword = keyword_for_tag(tag)
    vr = _vr_of(elem)
    if keyword in KEY_UIDS or (keyword in _IDENTIFIERS and not latin1):
        out[tag] = elem  # never altered
        return
    if vr is None or (vr == "SQ" and latin1):
        return
    if keyword in _TYPE2:
        try:
            values = _element_values(ds, elem, vr, latin1)
            fixed = _repair_type2(keyword, vr, values)
        except Exception:  # noqa: BLE001 - undecodable
            fixed = ""
        if fixed is not None:
            out.add_new(tag, _TYPE2[keyword], fixed)
            return
    elif vr in ("DS", "IS") and not _element_ok(ds, elem):
        number = _repair_number(vr, _element_values(ds, elem, vr))
        if number is not None:
            out.add_new(tag, vr, number)
        return
    elif not _element_ok(ds, elem, latin1=latin1):
        return
    if latin1 and vr in _TEXT_VRS:
        values = _element_values(ds, elem, vr, latin1)
        out.add_new(tag, vr, (values[0] if len(values) == 1 else values) if values else "")
    else:
        out[tag] = elem


def _complete(out: Dataset, keep_geometry: bool) -> None:
    """Add missing Type 2 attributes empty; drop an unfounded de-identification claim, and the geometry if asked."""
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
        for keyword in _GEOMETRY:
            if keyword in out:
                del out[keyword]
