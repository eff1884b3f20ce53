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
  only a missing one is added empty (and an invalid one, below, left empty);
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
- an identifier with more than one value (two Patient IDs: VM 1 in every
  result IOD) is left empty (Type 2) or dropped (Issuer of Patient ID);
- a sequence item without its Type 1 attributes is dropped (an Other
  Patient IDs item without Type of Patient ID; a code item without value,
  scheme or meaning), and the sequence with it when no item is left;
- a Specific Character Set with code extensions (ISO 2022, several
  values such as ``\\ISO 2022 IR 87`` or ``ISO 2022 IR 13\\ISO 2022 IR 87``),
  or one highdicom refuses: text values (sequences included) are decoded by
  pydicom with the source's character set and the result is written in
  UTF-8 (``ISO_IR 192``), so ``Yamada^Tarou=山田^太郎`` stays that name
  (earlier versions copied the ISO 2022 bytes, escape sequences and all,
  into a UTF-8 result); a single character set highdicom accepts
  (``ISO_IR 100``, ``GB18030``) is kept with the values as they are;
- a Specific Character Set pydicom does not know either (``ISO_IR 999``):
  text values are read as ISO 8859-1 and written in UTF-8; sequences are
  then dropped.

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
from pydicom.charset import python_encoding
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
# How a source's text is copied (:func:`_text_mode`): as it is, decoded by pydicom, or as ISO 8859-1.
_KEEP, _DECODE, _LATIN1 = "keep", "decode", "latin1"


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

    Examples
    --------
    >>> from pydicom.data import get_charset_files
    >>> import pydicom
    >>> src = pydicom.dcmread(get_charset_files("chrH31.dcm")[0])
    >>> ref = reference_dataset(src)
    >>> ref.SpecificCharacterSet, str(ref.PatientName) == str(src.PatientName)
    ('ISO_IR 192', True)
    """
    out = Dataset()
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    mode = _text_mode(attribute_strings(ds, "SpecificCharacterSet"))
    if mode != _KEEP:
        # Text is decoded (by pydicom, else as ISO 8859-1) and written as UTF-8.
        out.SpecificCharacterSet = "ISO_IR 192"
    for tag in list(ds.keys()):
        tag = BaseTag(tag)
        if _skip_tag(tag) or (tag == 0x00080005 and mode != _KEEP):
            continue
        _copy_element(ds, tag, out, mode)
    _complete(out, keep_geometry)
    return out


def _text_mode(charset: list[str] | None) -> str:
    """How text is copied: as it is (``keep``), decoded by pydicom (``decode``) or as ISO 8859-1 (``latin1``)."""
    terms = [t.strip() for t in charset or []]
    if not terms or (len(terms) == 1 and _charset_ok(terms)):
        return _KEEP
    if all(t in python_encoding for t in terms):
        return _DECODE  # code extensions (ISO 2022), or a set highdicom refuses that pydicom decodes
    return _LATIN1


def _decoded(ds: Dataset, tag: BaseTag, vr: str) -> DataElement:
    """The element decoded by pydicom with the data set's character set, as a new element (sequences deep)."""
    elem = ds[tag]
    if vr == "SQ":
        items = []
        for item in elem.value or []:
            new = Dataset()
            for t in item.keys():
                t = BaseTag(t)
                v = _vr_of(item.get_item(t))
                if v is not None and not _skip_tag(t):
                    new[t] = _decoded(item, t, v)
            items.append(new)
        return DataElement(tag, vr, items)
    if vr in _TEXT_VRS:
        values = [str(v) for v in _values(elem.value)]
        return DataElement(tag, vr, (values[0] if len(values) == 1 else values) if values else "")
    return DataElement(tag, vr, elem.value)


def _copy_element(ds: Dataset, tag: BaseTag, out: Dataset, mode: str) -> None:
    """Copy one element of ``ds`` into ``out`` as it is, repaired, or not at all."""
    elem = ds.get_item(tag)
    keyword = keyword_for_tag(tag)
    vr = _vr_of(elem)
    latin1 = mode == _LATIN1
    if keyword in KEY_UIDS:
        out[tag] = elem  # never altered
        return
    if vr is None or (vr == "SQ" and latin1):
        return
    if keyword in _IDENTIFIERS:
        _copy_identifier(ds, tag, out, mode)
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
    _put(ds, tag, elem, vr, out, mode)


def _put(ds: Dataset, tag: BaseTag, elem: DataElement | RawDataElement, vr: str, out: Dataset, mode: str) -> None:
    """Copy a valid element: text decoded unless the character set is kept; sequences without incomplete items."""
    if vr == "SQ":
        seq = _complete_items(tag, _decoded(ds, tag, vr) if mode == _DECODE else ds[tag])
        if seq is not None:
            out[tag] = seq
    elif mode == _LATIN1 and vr in _TEXT_VRS:
        values = _element_values(ds, elem, vr, True)
        out.add_new(tag, vr, (values[0] if len(values) == 1 else values) if values else "")
    elif mode == _DECODE and vr in _TEXT_VRS:
        out[tag] = _decoded(ds, tag, vr)
    else:
        out[tag] = elem


def _copy_identifier(ds: Dataset, tag: BaseTag, out: Dataset, mode: str) -> None:
    """An identifier exactly as sent (decoded if need be); one value only: else empty (Type 2) or dropped."""
    elem = ds.get_item(tag)
    vr = _vr_of(elem) or "LO"
    keyword = keyword_for_tag(tag)
    try:
        values = _element_values(ds, elem, vr, mode == _LATIN1)
        ok = len(values) <= 1 and all(valid_value(vr, v) for v in values)
    except Exception:  # noqa: BLE001 - undecodable
        ok = False
    if not ok:
        if keyword in _TYPE2:
            out.add_new(tag, _TYPE2[keyword], "")  # e.g. two Patient IDs: VM 1 in every result IOD
        return
    _put(ds, tag, elem, vr, out, mode)


# Sequences whose items have Type 1 attributes a source may leave out: such items are dropped.
_ITEM_TYPE1 = {"OtherPatientIDsSequence": ("PatientID", "TypeOfPatientID")}


def _has(item: Dataset, keyword: str) -> bool:
    return bool(str(item.get(keyword, "") or "").strip())


def _code_complete(item: Dataset) -> bool:
    """A code item with its Type 1 (and 1C) attributes: a value, its scheme (unless a URN) and a meaning."""
    if not _has(item, "CodeMeaning"):
        return False
    if _has(item, "URNCodeValue"):
        return True
    return (_has(item, "CodeValue") or _has(item, "LongCodeValue")) and _has(item, "CodingSchemeDesignator")


def _complete_items(tag: BaseTag, elem: DataElement) -> DataElement | None:
    """A sequence without the items that lack a Type 1 attribute (see :data:`_ITEM_TYPE1`, and code items).

    ``None`` when no item is left of a sequence that had some.
    """
    keyword = keyword_for_tag(tag)
    items = list(elem.value or [])
    if keyword in _ITEM_TYPE1:
        kept = [item for item in items if all(_has(item, k) for k in _ITEM_TYPE1[keyword])]
    elif keyword.endswith("CodeSequence"):
        kept = [item for item in items if _code_complete(item)]
    else:
        return elem
    if items and not kept:
        return None
    return DataElement(tag, "SQ", kept)


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
