"""The encoded-data walker: what a received DICOM instance holds, checked before any decode.

- :func:`scan_encoded` walks an encoded data set's elements (into every
  sequence item) without decoding values (no pydicom on the network
  thread), checks that the encoding is structurally whole (no truncated
  element, item or pixel data), enforces the input bounds of
  :class:`ScanLimits` (inflated size, frames, pixels per frame), checks
  that an image is one medge can decode (Image Pixel attributes, and the
  codestream header of every compressed frame against Rows x Columns:
  :mod:`edge.ingest.dicom.pixels`) and picks out the few attributes routing
  needs (:class:`InstanceInfo`). Deflated data sets are inflated in a stream by
  :func:`inflate_bounded` and refused as soon as they pass their bound,
  so a deflate bomb never reaches memory; :func:`split_part10` finds the
  data set in a spooled file so that the same checks run before any
  pydicom decode of it.

Routing and series assembly, which use what the scan found, are in
:mod:`edge.ingest.dicom.routing`.

Examples
--------
>>> ScanLimits(max_frames=10).max_frames
10
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import struct
from array import array
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

from edge.errors import DataError
from edge.ingest.dicom.pixels import (
    CODESTREAM_KINDS,
    CodestreamError,
    Geometry,
    IncompleteHeader,
    check_codestream,
    looks_like_frame_start,
)

__all__ = [
    "InstanceInfo",
    "ScanLimits",
    "SizeLimitError",
    "scan_encoded",
    "scan_and_inflate",
    "inflate_bounded",
    "split_part10",
    "KEY_UIDS",
    "KeyUidError",
    "check_key_uids",
    "valid_uid",
]

_log = logging.getLogger(__name__)

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"

# VRs whose explicit encoding has 2 reserved bytes and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD

_PIXEL_DATA = 0x7FE00010
# Image Pixel attributes (US) needed to check that native pixel data is complete.
_IMAGE_US = {0x00280002: "samples", 0x00280010: "rows", 0x00280011: "columns", 0x00280100: "bits"}
# Top-level elements kept as (value offset, length): the Extended Offset Table and its lengths.
_TOP_RAW = {0x7FE00001: "eot", 0x7FE00002: "eot_lengths"}
#: Bits Allocated and Samples per Pixel of the images medge decodes.
_BITS_ALLOCATED = (1, 8, 16, 32)
_SAMPLES_PER_PIXEL = (1, 3)
#: Photometric interpretations whose native encoding subsamples chroma horizontally (2 samples per pixel).
_SUBSAMPLED_422 = ("YBR_FULL_422", "YBR_PARTIAL_422")

# tag -> InstanceInfo field
_WANTED = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080060: "modality",
    0x00180015: "body_part",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00280008: "number_of_frames",
    0x00280004: "photometric",  # not routing: 4:2:2 YBR holds 2 samples per pixel, not 3 (PS3.5 8.2.1)
}
# Patient identity (tag -> name): read only to be hashed (InstanceInfo.patient_key), never kept or shown.
_PATIENT = {0x00100010: "name", 0x00100020: "id", 0x00100021: "issuer"}
#: The UIDs every routed instance must carry, valid (field of InstanceInfo -> name in messages).
KEY_UIDS = {
    "study_instance_uid": "Study Instance UID",
    "series_instance_uid": "Series Instance UID",
    "sop_instance_uid": "SOP Instance UID",
}
_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UID_MAX = 64


def valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a valid UI value: 1 to 64 characters, digits and dots, no empty component,
    no leading zero in a component other than ``0`` (PS3.5 9.1).

    Examples
    --------
    >>> valid_uid("1.2.840.10008.1.2"), valid_uid("1.02.3"), valid_uid("1..2"), valid_uid("")
    (True, False, False, False)
    """
    return 0 < len(uid) <= _UID_MAX and _UID_SYNTAX.fullmatch(uid) is not None


@dataclass(frozen=True)
class InstanceInfo:
    """The attributes routing and assembly need (no patient data)."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    modality: str = ""
    body_part: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    number_of_frames: int = 1
    #: The data set holds Pixel Data (native or encapsulated); an image instance without it cannot be run.
    has_pixels: bool = True
    #: A one-way hash (SHA-256, hex) of Patient ID, Issuer of Patient ID and Patient's Name as encoded;
    #: tells two patients apart without holding either. Never written to a path, log or label.
    patient_key: str = ""

    @property
    def identity(self) -> str:
        """A short hash of what makes this instance the object it is, besides its SOP Instance UID.

        Study, series, SOP class, Modality, Body Part Examined and the
        patient: two instances with the same SOP Instance UID and the same
        identity are the same object sent again; a different identity is a
        conflicting object (see :meth:`edge.ingest.dicom.spool.Spool.store_instance`).
        """
        parts = (self.study_instance_uid, self.series_instance_uid, self.sop_class_uid, self.modality,
                 self.body_part, self.patient_key)
        return hashlib.sha256("\x00".join(parts).encode("utf-8", "replace")).hexdigest()[:16]


# --------------------------------------------------------------------------- header scan
#: Deepest nesting of sequences and items the scan follows (real data sets nest a few levels;
#: without a bound, a few kilobytes of nested sequences would exhaust the stack).
MAX_NESTING = 32
#: Inflated bytes a deflated data set may hold besides its declared image (all other elements:
#: overlays, icons, private data). Before the pixel data element is reached, this is the bound.
OTHER_ELEMENTS_BYTES = 32 << 20
#: Bytes inflated per step (zlib ``max_length``): a bound is overshot by at most this much.
INFLATE_CHUNK_BYTES = 256 << 10
#: Bytes of a frame's first fragments read at most to find its codestream header (JPEG marker
#: segments before the frame header, a JP2 box structure): real headers take a few hundred.
CODESTREAM_HEAD_BYTES = 1 << 20
_MAX_COMMENT = 64  # Error Comment (0000,0902) is LO: at most 64 characters


class SizeLimitError(DataError):
    """An instance is over one of the input bounds (``[dicom] max_inflated_mb``, ``max_frames``, ``max_pixels``).

    Parameters
    ----------
    message : str
        A sentence naming the limit, its value and its configuration key (never patient data).
    key : str
        The ``[dicom]`` configuration key of the limit.
    comment : str
        At most 64 characters, for the Error Comment of the C-STORE response.
    """

    def __init__(self, message: str, key: str, comment: str) -> None:
        super().__init__(message)
        self.key = key
        self.comment = comment[:_MAX_COMMENT]


class KeyUidError(DataError):
    """A key UID (:data:`KEY_UIDS`) is missing, empty, too long or not a valid UID.

    ``comment`` (at most 64 characters, for the Error Comment) names the
    attribute and the fault, never the value.
    """

    def __init__(self, message: str, comment: str) -> None:
        super().__init__(message)
        self.comment = comment[:_MAX_COMMENT]


@dataclass(frozen=True)
class ScanLimits:
    """Input bounds checked on the encoded data before anything is decoded or allocated.

    Parameters
    ----------
    max_inflated_bytes : int
        A deflated data set is refused once its inflated size passes this
        (``[dicom] max_inflated_mb``), or once it passes its declared image
        size (Rows x Columns x Samples x Bits Allocated / 8 x Frames) plus
        ``other_elements_bytes``, whichever is smaller.
    max_frames : int
        Number of Frames above this is refused (``[dicom] max_frames``).
    max_pixels : int
        Rows x Columns above this is refused (``[dicom] max_pixels``).
    other_elements_bytes : int
        Inflated bytes allowed besides the declared image (see :data:`OTHER_ELEMENTS_BYTES`).

    Examples
    --------
    >>> ScanLimits(max_frames=10).max_frames
    10
    """

    max_inflated_bytes: int = 512 << 20
    max_frames: int = 1000
    max_pixels: int = 4096 * 4096
    other_elements_bytes: int = OTHER_ELEMENTS_BYTES

    @classmethod
    def from_config(cls, dicom: Any) -> "ScanLimits":
        """The bounds of a ``[dicom]`` section (:class:`edge.config.DicomConfig`)."""
        return cls(
            max_inflated_bytes=int(dicom.max_inflated_mb) << 20,
            max_frames=int(dicom.max_frames),
            max_pixels=int(dicom.max_pixels),
        )


class _Reader:
    """Walks encoded elements; raises DataError on any structural problem."""

    def __init__(self, data: bytes | bytearray | memoryview, implicit: bool, little: bool) -> None:
        self.data = memoryview(data)
        self.implicit = implicit
        self.end = "<" if little else ">"
        self.found: dict[str, str] = {}
        self.patient: dict[str, bytes] = {}
        self.image: dict[str, int] = {}
        self.raw: dict[str, tuple[int, int]] = {}
        # Top-level encapsulated Pixel Data: its Basic Offset Table and fragments (value offset, length).
        self.encapsulated = False
        self.bot: tuple[int, int] = (0, 0)
        self.frag_pos = array("Q")
        self.frag_len = array("Q")

    def _header(self, pos: int) -> tuple[int, bytes, int, int]:
        """(tag, vr, value length, value offset) of the element at ``pos``."""
        d = self.data
        if pos + 8 > len(d):
            raise DataError(f"Data set is truncated inside an element header at byte {pos}.")
        group, elem = struct.unpack_from(self.end + "HH", d, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE or self.implicit:
            (length,) = struct.unpack_from(self.end + "I", d, pos + 4)
            return tag, b"", length, pos + 8
        vr = bytes(d[pos + 4 : pos + 6])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise DataError(f"Element ({group:04X},{elem:04X}) has an invalid VR at byte {pos}.")
        if vr in _LONG_VRS:
            if pos + 12 > len(d):
                raise DataError(f"Data set is truncated inside an element header at byte {pos}.")
            (length,) = struct.unpack_from(self.end + "I", d, pos + 8)
            return tag, vr, length, pos + 12
        (length,) = struct.unpack_from(self.end + "H", d, pos + 6)
        return tag, vr, length, pos + 8

    def record(self, tag: int, length: int, vpos: int) -> None:
        """Keep a top-level attribute that routing or the input bounds need."""
        if tag in _TOP_RAW:
            self.raw[_TOP_RAW[tag]] = (vpos, length)
        elif tag in _WANTED:
            raw = bytes(self.data[vpos : vpos + length])
            self.found[_WANTED[tag]] = raw.decode("ascii", "replace").strip(" \x00")
        elif tag in _PATIENT:
            self.patient[_PATIENT[tag]] = bytes(self.data[vpos : vpos + length]).strip(b" \x00")
        elif tag in _IMAGE_US:
            if length == 2:
                self.image[_IMAGE_US[tag]] = struct.unpack_from(self.end + "H", self.data, vpos)[0]
            elif length != 0:
                # Anything but US would let a decoder read a size this scan did not check.
                raise DataError(f"Element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has {length} bytes; US needs 2.")

    def walk(self, pos: int, stop: int, until_item_end: bool, top: bool, depth: int = 0) -> int:
        """Walk elements from ``pos``; returns the offset after the last one."""
        last_tag = -1
        while pos < stop:
            tag, vr, length, vpos = self._header(pos)
            if tag == _ITEM_END:
                if not until_item_end:
                    raise DataError(f"Unexpected item delimiter at byte {pos}.")
                return vpos
            if top and tag < last_tag:
                raise DataError(f"Elements out of order at byte {pos}; the data set is corrupt.")
            last_tag = tag
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA or vr in (b"OB", b"OW"):
                    # Encapsulated pixel data (also an icon's): fragments, not nested data sets.
                    pos = self._fragments(vpos, stop, record=top and tag == _PIXEL_DATA)
                elif vr in (b"SQ", b"UN", b""):
                    # A UN of undefined length is a sequence encoded in Implicit VR Little Endian (PS3.5 6.2.2).
                    pos = self._items(vpos, stop, depth=depth + 1, implicit=True if vr == b"UN" else None)
                else:
                    raise DataError(f"Undefined length on a VR {vr.decode()} element at byte {pos}.")
                continue
            if vpos + length > stop:
                raise DataError(
                    f"Element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of {length} bytes runs past "
                    f"the end of the data set; it is truncated."
                )
            if top and (tag in _WANTED or tag in _IMAGE_US or tag in _TOP_RAW or tag in _PATIENT):
                self.record(tag, length, vpos)
            elif top and tag == _PIXEL_DATA:
                self.image["pixel_bytes"] = length
            elif vr == b"SQ" or (
                self.implicit and tag != _PIXEL_DATA and length >= 8 and tag & 0xFFFF != 0 and self._looks_like_item(vpos)
            ):
                self._items(vpos, vpos + length, defined=True, depth=depth + 1)
            pos = vpos + length
        if until_item_end:
            raise DataError("Data set ended inside an item without its delimiter.")
        return pos

    def _looks_like_item(self, pos: int) -> bool:
        (tag_g, tag_e) = struct.unpack_from(self.end + "HH", self.data, pos)
        return tag_g == 0xFFFE and tag_e == 0xE000

    def _items(self, pos: int, stop: int, defined: bool = False, depth: int = 1, implicit: bool | None = None) -> int:
        """Walk sequence items from ``pos``, into each item's data set (defined length or not).

        ``depth`` counts sequence levels, whatever their length encoding: a
        sequence nested deeper than :data:`MAX_NESTING` is refused.
        ``implicit`` switches the items' encoding (a UN sequence).
        """
        if depth > MAX_NESTING:
            raise DataError(f"Sequences are nested deeper than {MAX_NESTING} levels at byte {pos}.")
        saved = self.implicit
        if implicit is not None:
            self.implicit = implicit
        try:
            limit = min(stop, len(self.data))
            while pos < limit:
                tag, _vr, length, vpos = self._header(pos)
                if tag == _SEQ_END:
                    return vpos
                if tag != _ITEM:
                    raise DataError(f"Expected an item at byte {pos}; the sequence is corrupt.")
                if length == _UNDEFINED:
                    pos = self.walk(vpos, limit, until_item_end=True, top=False, depth=depth)
                else:
                    if vpos + length > limit:
                        raise DataError(f"Item of {length} bytes at byte {pos} is truncated.")
                    self.walk(vpos, vpos + length, until_item_end=False, top=False, depth=depth)
                    pos = vpos + length
            if defined:
                return pos
            raise DataError("Data set ended inside a sequence without its delimiter.")
        finally:
            self.implicit = saved

    def _fragments(self, pos: int, stop: int, record: bool) -> int:
        """Walk the items of encapsulated pixel data (Basic Offset Table, then fragments) from ``pos``.

        With ``record`` (the top-level Pixel Data) the Basic Offset Table and
        each fragment's value offset and length are kept for the codestream checks.
        """
        limit = min(stop, len(self.data))
        first = True
        if record:
            self.encapsulated = True
        while pos < limit:
            tag, _vr, length, vpos = self._header(pos)
            if tag == _SEQ_END:
                return vpos
            if tag != _ITEM:
                raise DataError(f"Expected a fragment at byte {pos}; the encapsulated pixel data is corrupt.")
            if length == _UNDEFINED:
                raise DataError(f"Fragment of undefined length at byte {pos}; the encapsulated pixel data is corrupt.")
            if vpos + length > limit:
                raise DataError(f"Fragment of {length} bytes at byte {pos} is truncated.")
            if record:
                if first:
                    self.bot = (vpos, length)
                else:
                    self.frag_pos.append(vpos)
                    self.frag_len.append(length)
            first = False
            pos = vpos + length
        raise DataError("Data set ended inside encapsulated pixel data without its delimiter.")


def _number_of_frames(raw: str) -> int:
    """Number of Frames (IS) as an int, at least 1; DataError when it is not a whole number."""
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        try:
            x = float(raw)
        except ValueError:
            raise DataError("Number of Frames is not a number.") from None
        if not math.isfinite(x) or not x.is_integer():
            raise DataError("Number of Frames is not a whole number.") from None
        n = int(x)
    return max(1, n)


def _check_image(image: dict[str, int], frames: int, limits: ScanLimits) -> None:
    """Refuse frame counts and frame sizes over the configured bounds."""
    if frames > limits.max_frames:
        raise SizeLimitError(
            f"Number of Frames {frames} is over the limit of {limits.max_frames} ([dicom] max_frames).",
            "max_frames",
            "NumberOfFrames over the limit ([dicom] max_frames)",
        )
    rows, columns = image.get("rows"), image.get("columns")
    if rows is not None and columns is not None and rows * columns > limits.max_pixels:
        raise SizeLimitError(
            f"Rows x Columns {rows} x {columns} = {rows * columns} pixels is over the limit of "
            f"{limits.max_pixels} ([dicom] max_pixels).",
            "max_pixels",
            "Rows x Columns over the limit ([dicom] max_pixels)",
        )


def _check_pixel_module(image: dict[str, int]) -> Geometry:
    """The image of a data set with Pixel Data, or DataError when medge could never decode it.

    Rows and Columns at least 1, Bits Allocated 1, 8, 16 or 32, Samples per
    Pixel 1 or 3, all present. Messages name the attribute, never its value.
    """
    names = (("rows", "Rows"), ("columns", "Columns"), ("bits", "Bits Allocated"), ("samples", "Samples per Pixel"))
    for key, name in names:
        if key not in image:
            raise DataError(f"Image has Pixel Data but no {name}.")
    if image["rows"] == 0 or image["columns"] == 0:
        raise DataError("Image has Pixel Data but Rows or Columns is 0.")
    if image["bits"] not in _BITS_ALLOCATED:
        raise DataError("Image has Bits Allocated other than 1, 8, 16 or 32.")
    if image["samples"] not in _SAMPLES_PER_PIXEL:
        raise DataError("Image has Samples per Pixel other than 1 or 3.")
    return Geometry(image["rows"], image["columns"], image["samples"], image["bits"])


def _match_offsets(offsets: Iterable[int], reader: "_Reader", table: str) -> None:
    """Every offset of ``table`` must be the start of a fragment's item (ascending), as pydicom cuts frames there."""
    starts, base = reader.frag_pos, reader.frag_pos[0] - 8  # offsets count from the first fragment's item tag
    j, n = 0, len(starts)
    for off in offsets:
        while j < n and starts[j] - 8 - base < off:
            j += 1
        if j == n or starts[j] - 8 - base != off:
            raise DataError(f"The {table} points between fragments; the encapsulated pixel data is corrupt.")


def _check_encapsulated(reader: "_Reader", kind: str, image: Geometry) -> None:
    """Check the offset tables and the codestream header of every fragment that starts a frame.

    pydicom hands a decoder a frame that starts at a fragment (the offset
    tables are checked to point at fragment starts), and every decoder
    needs its start marker at byte 0: so a fragment that does not start
    with one is never decoded as a frame start, and every one that does is
    checked here (for RLE, every fragment is a frame). When a header runs
    past its fragment, the next fragments are joined, up to
    :data:`CODESTREAM_HEAD_BYTES`.
    """
    d, starts, lengths = reader.data, reader.frag_pos, reader.frag_len
    if not starts:
        raise DataError("Encapsulated Pixel Data has no fragments.")
    bot_pos, bot_len = reader.bot
    if bot_len:
        if bot_len % 4:
            raise DataError("The Basic Offset Table is not a whole number of offsets.")
        table = d[bot_pos : bot_pos + bot_len]
        _match_offsets((o for (o,) in struct.iter_unpack("<I", table)), reader, "Basic Offset Table")
    if "eot" in reader.raw:
        eot_pos, eot_len = reader.raw["eot"]
        if eot_len % 8:
            raise DataError("The Extended Offset Table is not a whole number of offsets.")
        table = d[eot_pos : eot_pos + eot_len]
        _match_offsets((o for (o,) in struct.iter_unpack("<Q", table)), reader, "Extended Offset Table")
    n, frame = len(starts), 0
    for i in range(n):
        start, length = starts[i], lengths[i]
        if i and kind != "rle" and (
            length < 2 or d[start] not in (0xFF, 0x00) or not looks_like_frame_start(kind, d[start : start + 12])
        ):
            continue  # a continuation fragment: never the start of what a decoder gets (JP2 starts with 0x00)
        frame += 1
        head: bytes | memoryview = d[start : start + length]
        j = i
        while True:
            try:
                check_codestream(kind, head, image, length, frame=frame)
                break
            except IncompleteHeader as exc:
                if kind == "rle" or j + 1 >= n or len(head) >= CODESTREAM_HEAD_BYTES:
                    raise CodestreamError(f"Frame {frame}: {exc}", exc.comment) from None
                j += 1
                more = min(lengths[j], CODESTREAM_HEAD_BYTES - len(head))
                head = bytes(head) + bytes(d[starts[j] : starts[j] + more])


def _image_bytes(image: dict[str, int], frames: int) -> int | None:
    """Bytes the declared image needs (native encoding), or None when Rows, Columns or Bits are missing."""
    if not all(k in image for k in ("rows", "columns", "bits")):
        return None
    return (image["rows"] * image["columns"] * image.get("samples", 1) * image["bits"] * frames + 7) // 8


class _InflateProbe:
    """Follows the top-level elements of a data set while it is being inflated.

    Until the Pixel Data element is reached, everything counts as "other
    elements" (bound: ``other_elements_bytes``). At the Pixel Data header the
    declared image size is known (Image Pixel attributes precede it in tag
    order), the frame and pixel bounds are checked, and the bound becomes
    image + other elements, capped by ``max_inflated_bytes``.
    """

    def __init__(self, limits: ScanLimits) -> None:
        self.limits = limits
        self.limit = min(limits.max_inflated_bytes, limits.other_elements_bytes)
        self.image_bytes: int | None = None
        self._image: dict[str, int] = {}
        self._found: dict[str, str] = {}
        self._pos = 0
        self._done = False
        self._retry_at = 0

    def feed(self, buf: bytearray) -> None:
        """Look at the newly inflated bytes; raises SizeLimitError as soon as a bound is certain to be passed."""
        if self._done or len(buf) < self._retry_at:
            return
        r = _Reader(buf, implicit=False, little=True)
        r.image, r.found = self._image, self._found  # shared: what was read before is kept
        n = len(buf)
        try:
            while self._pos + 12 <= n:
                tag, _vr, length, vpos = r._header(self._pos)
                if tag == _PIXEL_DATA:
                    self._done = True
                    self._at_pixel_data(r, length, vpos)
                    return
                if tag > _PIXEL_DATA:
                    self._done = True  # no pixel data: every byte is "other elements"
                    return
                if length == _UNDEFINED:
                    try:
                        end = r._items(vpos, n, depth=1)
                    except DataError:
                        # Incomplete (or corrupt) sequence: look again once much more has arrived.
                        self._retry_at = 2 * n
                        return
                    self._pos = end
                    continue
                if vpos + length > n:
                    return
                if tag in _WANTED or tag in _IMAGE_US:
                    r.record(tag, length, vpos)
                self._pos = vpos + length
        except SizeLimitError:
            raise
        except (DataError, struct.error):
            self._done = True  # corrupt: the full scan says why; the bound stays "other elements"
        finally:
            r.data.release()  # the bytearray must stay resizable

    def _at_pixel_data(self, r: _Reader, length: int, vpos: int) -> None:
        frames = _number_of_frames(r.found.get("number_of_frames", ""))
        _check_image(r.image, frames, self.limits)
        image = _image_bytes(r.image, frames)
        if image is None:
            return
        self.image_bytes = image
        self.limit = min(self.limits.max_inflated_bytes, image + self.limits.other_elements_bytes)
        if length != _UNDEFINED and vpos + length > self.limit:
            raise self.over(vpos + length)

    def over(self, size: int) -> SizeLimitError:
        """The error for an inflated size of ``size`` bytes past the bound."""
        cap_mb = self.limits.max_inflated_bytes >> 20
        if self.image_bytes is not None:
            what = (
                f"its declared image of {self.image_bytes} bytes plus {self.limits.other_elements_bytes} bytes "
                f"of other elements, capped by [dicom] max_inflated_mb = {cap_mb}"
            )
        else:
            what = (
                f"{self.limits.other_elements_bytes} bytes of elements besides a declared image, "
                f"capped by [dicom] max_inflated_mb = {cap_mb}"
            )
        return SizeLimitError(
            f"Deflated data set inflates to more than {self.limit} bytes (at least {size}); the limit is {what}.",
            "max_inflated_mb",
            "Inflated size over the limit ([dicom] max_inflated_mb)",
        )


def inflate_bounded(data: bytes | bytearray | memoryview, limits: ScanLimits | None = None) -> bytearray:
    """Inflate a Deflated Explicit VR Little Endian data set without ever holding more than its bound.

    The raw deflate stream is inflated :data:`INFLATE_CHUNK_BYTES` at a time
    (``zlib.decompressobj`` with ``max_length``); after each step the bytes
    so far are checked against the bound of ``limits`` (see
    :class:`ScanLimits`), so a data set that would inflate to gigabytes is
    refused after at most the bound plus one step.

    Raises
    ------
    SizeLimitError
        The inflated size, Number of Frames or Rows x Columns is over its bound.
    DataError
        The deflate stream is corrupt or truncated.

    Examples
    --------
    >>> import zlib
    >>> c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    >>> bytes(inflate_bounded(c.compress(b"abc") + c.flush()))
    b'abc'
    """
    limits = limits or ScanLimits()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    probe = _InflateProbe(limits)
    out = bytearray()
    pending: bytes | bytearray | memoryview = data
    try:
        while True:
            chunk = inflater.decompress(pending, INFLATE_CHUNK_BYTES)
            pending = inflater.unconsumed_tail
            if chunk:
                out += chunk
                probe.feed(out)
                if len(out) > probe.limit:
                    raise probe.over(len(out))
            elif not pending or inflater.eof:
                break
    except zlib.error as exc:
        raise DataError(f"Deflated data set cannot be inflated (corrupt deflate stream): {exc}.") from exc
    if not inflater.eof:
        raise DataError("Deflated data set ends before its deflate stream does; it is truncated.")
    return out


def scan_and_inflate(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, limits: ScanLimits | None = None
) -> tuple[InstanceInfo, bytes | bytearray | memoryview]:
    """Like :func:`scan_encoded`, and also return the data set as walked (inflated when it was deflated)."""
    limits = limits or ScanLimits()
    if transfer_syntax_uid == DEFLATED_LE:
        data = inflate_bounded(data, limits)
    implicit = transfer_syntax_uid == IMPLICIT_VR_LE
    little = transfer_syntax_uid != EXPLICIT_VR_BE
    if len(data) < 8:
        raise DataError("Data set is empty or shorter than one element.")
    reader = _Reader(data, implicit=implicit, little=little)
    try:
        reader.walk(0, len(data), until_item_end=False, top=True)
    except struct.error as exc:
        raise DataError(f"Data set is truncated: {exc}.") from exc
    f = reader.found
    if not f.get("sop_class_uid") or not f.get("sop_instance_uid"):
        raise DataError("Data set has no SOP Class UID or SOP Instance UID.")
    frames = _number_of_frames(f.get("number_of_frames", ""))
    img = reader.image
    _check_image(img, frames, limits)
    kind = CODESTREAM_KINDS.get(transfer_syntax_uid)
    if "pixel_bytes" in img or reader.encapsulated:
        geometry = _check_pixel_module(img)
        if reader.encapsulated:
            if kind is None:
                raise DataError("Pixel Data is encapsulated but the transfer syntax is not a compressed one.")
            _check_encapsulated(reader, kind, geometry)
        elif kind is not None:
            raise DataError("Pixel Data is not encapsulated but the transfer syntax is a compressed one.")
    needed = _image_bytes(img, frames)
    if needed is not None and f.get("photometric", "").upper() in _SUBSAMPLED_422 and img.get("samples") == 3:
        # Y Y Cb Cr for every two pixels: two thirds of the full-colour size (odd widths are not allowed).
        needed = (img["rows"] * img["columns"] * 2 * img["bits"] * frames + 7) // 8
    if "pixel_bytes" in img and needed is not None and img["pixel_bytes"] < needed:
        # Native (defined-length) pixel data must hold every pixel the header declares.
        raise DataError(f"Pixel data holds {img['pixel_bytes']} bytes but the image needs {needed}; it is truncated.")
    info = InstanceInfo(
        sop_class_uid=f.get("sop_class_uid", ""),
        sop_instance_uid=f.get("sop_instance_uid", ""),
        modality=f.get("modality", ""),
        body_part=f.get("body_part", ""),
        study_instance_uid=f.get("study_instance_uid", ""),
        series_instance_uid=f.get("series_instance_uid", ""),
        number_of_frames=frames,
        has_pixels="pixel_bytes" in img or reader.encapsulated,
        patient_key=_patient_key(reader.patient),
    )
    return info, data


def check_key_uids(info: InstanceInfo) -> None:
    """Raise :class:`KeyUidError` unless the Study, Series and SOP Instance UIDs of ``info`` are valid UIDs.

    Checked for every instance that is stored (a routed one) and again at
    recovery: results reference the instance by these UIDs. The error's
    comment names the attribute and the fault, never the value.

    Examples
    --------
    >>> check_key_uids(InstanceInfo(sop_instance_uid="1.2.3", study_instance_uid="1.2", series_instance_uid="1.2.4"))
    >>> check_key_uids(InstanceInfo(sop_instance_uid="1.2.3", study_instance_uid="1.02"))
    Traceback (most recent call last):
    ...
    edge.ingest.dicom.scan.KeyUidError: The data set's Study Instance UID is not a valid UID; results could not reference it.
    """
    for key, name in KEY_UIDS.items():
        value = getattr(info, key)
        if not value:
            what = "missing or empty"
        elif len(value) > _UID_MAX:
            what = "longer than 64 characters"
        elif not valid_uid(value):
            what = "not a valid UID"
        else:
            continue
        raise KeyUidError(f"The data set's {name} is {what}; results could not reference it.", f"{name} {what}")


def _patient_key(patient: dict[str, bytes]) -> str:
    """SHA-256 (hex) of the encoded patient identity attributes; the same bytes give the same key."""
    h = hashlib.sha256()
    for name in ("id", "issuer", "name"):
        value = patient.get(name, b"")
        h.update(len(value).to_bytes(4, "big") + value)
    return h.hexdigest()


def scan_encoded(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, limits: ScanLimits | None = None
) -> InstanceInfo:
    """Check an encoded data set's structure and bounds, and read the routing attributes.

    Walks every element (into sequences and encapsulated pixel data) by tag
    and length only; no value is decoded except the handful routing and the
    bounds need. Deflated data sets are inflated by :func:`inflate_bounded`
    first. Costs tens of microseconds for a typical image.

    Parameters
    ----------
    data : bytes-like
        The data set as encoded in ``transfer_syntax_uid`` (no file meta).
    transfer_syntax_uid : str
    limits : ScanLimits, optional
        Input bounds (default: the defaults of ``[dicom]``).

    With Pixel Data, the Image Pixel attributes must describe an image
    medge can decode (Rows, Columns >= 1; Bits Allocated 1, 8, 16, 32;
    Samples per Pixel 1, 3). Encapsulated pixel data must be in a
    compressed transfer syntax (and native pixel data in a native one); its
    offset tables must point at fragment starts, and the codestream header
    of every fragment that starts a frame must declare no more than the
    data set's image (:func:`edge.ingest.dicom.pixels.check_codestream`).

    Raises
    ------
    SizeLimitError
        Over a bound: inflated size, Number of Frames, or Rows x Columns.
    edge.ingest.dicom.pixels.FrameGeometryError
        A compressed frame's codestream declares more than the data set's image.
    DataError
        If the encoding is truncated or structurally broken, nested deeper
        than :data:`MAX_NESTING` (sequences of defined or undefined length),
        has no SOP Class/Instance UID, is an image medge cannot decode, or
        a codestream header cannot be read (:class:`edge.ingest.dicom.pixels.CodestreamError`).
    """
    return scan_and_inflate(data, transfer_syntax_uid, limits)[0]


def split_part10(raw: bytes | bytearray | memoryview) -> tuple[str, int]:
    """(Transfer Syntax UID, offset of the data set) of a DICOM Part 10 file's bytes.

    Walks the file meta information (group 0002, Explicit VR Little Endian)
    by tag and length only.

    Raises
    ------
    DataError
        No ``DICM`` prefix, truncated or corrupt file meta, or no Transfer Syntax UID.
    """
    mv = memoryview(raw)
    if len(mv) < 132 or bytes(mv[128:132]) != b"DICM":
        raise DataError("Not a DICOM Part 10 file (no DICM prefix after the preamble).")
    reader = _Reader(mv, implicit=False, little=True)
    pos, ts = 132, ""
    try:
        while pos + 8 <= len(mv) and struct.unpack_from("<H", mv, pos)[0] == 0x0002:
            tag, _vr, length, vpos = reader._header(pos)
            if length == _UNDEFINED or vpos + length > len(mv):
                raise DataError("File meta information is truncated or corrupt.")
            if tag == 0x00020010:
                ts = bytes(mv[vpos : vpos + length]).decode("ascii", "replace").strip(" \x00")
            pos = vpos + length
    except struct.error as exc:
        raise DataError(f"File meta information is truncated: {exc}.") from exc
    if not ts:
        raise DataError("File meta information has no Transfer Syntax UID.")
    return ts, pos
