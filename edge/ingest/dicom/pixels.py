"""DICOM pixel data to arrays in modality units.

One place for photometric interpretation, rescale slope/intercept and the
VOI window, used by the DICOM ingest and by the trainer's DICOM loader.
Compressed transfer syntaxes decode through pydicom's pixel handlers
(pylibjpeg + plugins for JPEG, JPEG-LS, JPEG 2000 and RLE).

:func:`decode_frame` decodes one frame at a time, so a multi-frame
instance never needs all its frames in memory at once (the DICOM workers
use it; :func:`decode_frames` decodes them all, for small instances).
Errors name the frame and the transfer syntax and the type of the
decoder's error, never its message: a decoder's message may quote element
values, and these messages reach logs and the spool's reason files.

**Codestream headers before decoding.** A decoder sizes its output from
the frame's own codestream header (JPEG and JPEG-LS SOFn, JPEG 2000 SIZ,
RLE's segment table), not from the data set's Rows and Columns: a 2 KB
JPEG 2000 stream can declare 60000 x 60000 pixels in a data set of 64 x 64.
:func:`check_codestream` reads that header (a few hundred bytes, no
decoding) and refuses a frame whose declared geometry is larger than the
data set's (:class:`FrameGeometryError`) or whose header cannot be read
(:class:`CodestreamError`). :func:`edge.ingest.dicom.scan.scan_encoded` runs it on
every fragment that starts a frame when an instance is received, and
:func:`decode_frame` runs it again on the exact bytes the decoder gets.
RLE frames are always decoded by pylibjpeg-rle when it is installed
(its output is bounded by Rows x Columns; pydicom's pure-Python fallback
expands a crafted segment 64-fold before it checks the length).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.pixels.utils import as_pixel_options

from edge.errors import DataError

__all__ = [
    "number_of_frames",
    "decode_frame",
    "decode_frames",
    "frame_to_array",
    "iter_frames",
    "CODESTREAM_KINDS",
    "Geometry",
    "CodestreamError",
    "FrameGeometryError",
    "IncompleteHeader",
    "jpeg_header",
    "j2k_header",
    "rle_header",
    "check_codestream",
    "looks_like_frame_start",
]

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- codestream headers
#: Compressed transfer syntaxes the SCP accepts -> the codestream in each frame.
CODESTREAM_KINDS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "jpeg",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "jpeg",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57": "jpeg",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "jpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "jpeg-ls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "jpeg-ls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "j2k",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "j2k",  # JPEG 2000
    "1.2.840.10008.1.2.5": "rle",  # RLE Lossless
}
_KIND_NAMES = {"jpeg": "JPEG", "jpeg-ls": "JPEG-LS", "j2k": "JPEG 2000", "rle": "RLE"}
_RLE_UID = "1.2.840.10008.1.2.5"

#: JPEG frame headers of the non-hierarchical processes (Huffman and arithmetic: SOF0-3, SOF9-11).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB})
#: JPEG-LS frame header (SOF55).
_JPEG_LS_SOF = 0xF7
#: Every other frame header (hierarchical SOF5-7/13-15, DHP, and SOF55 in a JPEG syntax): refused.
_OTHER_SOF = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE, 0xF7})
_JPEG_LSE = 0xF8
_JPEG_SOS = 0xDA
#: Marker segments read before the scan header at most (real streams have a dozen).
_JPEG_MAX_SEGMENTS = 4096
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_START = b"\xff\x4f\xff\x51"  # SOC, then SIZ (which must follow it)
#: JPEG 2000 allows at most 65535 tiles (Isot is 16 bits); openjpeg refuses more too.
_J2K_MAX_TILES = 65535


@dataclass(frozen=True)
class Geometry:
    """What a frame decodes to: rows, columns, samples per pixel and bits per sample.

    For a data set: Rows, Columns, Samples per Pixel, Bits Allocated. For a
    codestream: what its header declares (bits = its sample precision).
    """

    rows: int
    columns: int
    samples: int
    bits: int

    def fits_in(self, other: "Geometry") -> bool:
        """True when no dimension is larger than ``other``'s."""
        return (
            self.rows <= other.rows
            and self.columns <= other.columns
            and self.samples <= other.samples
            and self.bits <= other.bits
        )


class CodestreamError(DataError):
    """A frame's codestream header cannot be read, or is of a kind its transfer syntax does not allow.

    ``comment`` is at most 64 characters, for a C-STORE Error Comment (no
    element value of the data set).
    """

    def __init__(self, message: str, comment: str = "") -> None:
        super().__init__(message)
        self.comment = (comment or "Frame codestream header cannot be read")[:64]


class FrameGeometryError(CodestreamError):
    """A frame's codestream declares more rows, columns, samples or bits than the data set holds."""


class IncompleteHeader(CodestreamError):
    """The header runs past the bytes given; more bytes of the frame may complete it."""


def _u16(buf: memoryview, pos: int) -> int:
    if pos + 2 > len(buf):
        raise IncompleteHeader(f"Codestream header ends at byte {len(buf)}, inside a field at byte {pos}.")
    return (buf[pos] << 8) | buf[pos + 1]


def jpeg_header(data: bytes | bytearray | memoryview, jpeg_ls: bool = False) -> Geometry:
    """The frame geometry a JPEG (or, with ``jpeg_ls``, JPEG-LS) codestream declares.

    Walks the marker segments from SOI to the first scan header (SOS),
    reading only their lengths and the frame header (SOF0-3 and SOF9-11
    for JPEG; SOF55 for JPEG-LS). Hierarchical processes, a height or width
    of 0 (defined later by DNL, or by a JPEG-LS oversize LSE segment), a
    second frame header and a JPEG-LS LSE oversize-dimension segment are
    refused: a decoder would size its output from values this walk cannot
    see.

    Raises
    ------
    CodestreamError
        The header is malformed, incomplete, or of another process.

    Examples
    --------
    >>> sof = b"\\xff\\xc0\\x00\\x0b\\x08\\x00\\x40\\x00\\x50\\x01\\x01\\x11\\x00"
    >>> jpeg_header(b"\\xff\\xd8" + sof + b"\\xff\\xda\\x00\\x08\\x01\\x01\\x00\\x00\\x3f\\x00")
    Geometry(rows=64, columns=80, samples=1, bits=8)
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    name = "JPEG-LS" if jpeg_ls else "JPEG"
    bad = f"Frame {name} header cannot be read"
    n = len(buf)
    if n < 2:
        raise IncompleteHeader(f"{name} codestream of {n} bytes has no SOI marker.", bad)
    if buf[0] != 0xFF or buf[1] != 0xD8:
        raise CodestreamError(f"{name} codestream does not start with an SOI marker.", bad)
    pos, found, segments = 2, None, 0
    while True:
        segments += 1
        if segments > _JPEG_MAX_SEGMENTS:
            raise CodestreamError(f"{name} header has more than {_JPEG_MAX_SEGMENTS} marker segments.", bad)
        marker, pos = _jpeg_marker(buf, pos, name, bad)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            continue
        if marker in (0xD8, 0xD9, 0x00):
            raise CodestreamError(f"{name} header has marker 0x{marker:02X} before its scan header.", bad)
        length = _u16(buf, pos)
        if length < 2:
            raise CodestreamError(f"{name} marker segment at byte {pos} has length {length}.", bad)
        if marker == _JPEG_SOS:
            if found is None:
                raise CodestreamError(f"{name} scan header comes before any frame header.", bad)
            return found
        is_sof = marker == _JPEG_LS_SOF if jpeg_ls else marker in _JPEG_SOF
        if is_sof:
            if found is not None:
                raise CodestreamError(f"{name} codestream has a second frame header.", bad)
            found = _jpeg_frame_header(buf, pos, length, name, bad)
        else:
            _jpeg_check_segment(buf, pos, marker, jpeg_ls, name, bad)
        pos += length


def _jpeg_marker(buf: memoryview, pos: int, name: str, bad: str) -> tuple[int, int]:
    """The marker at ``pos`` (after any fill bytes) and the position just after it."""
    n = len(buf)
    if pos >= n:
        raise IncompleteHeader(f"{name} header ends at byte {n} before its scan header.", bad)
    if buf[pos] != 0xFF:
        raise CodestreamError(f"{name} header has no marker at byte {pos}.", bad)
    fill = pos
    while pos < n and buf[pos] == 0xFF:
        pos += 1
        if pos - fill > 64:  # fill bytes: allowed, never more than a few
            raise CodestreamError(f"{name} header has a run of fill bytes at byte {fill}.", bad)
    if pos >= n:
        raise IncompleteHeader(f"{name} header ends at byte {n} inside a marker.", bad)
    return buf[pos], pos + 1


def _jpeg_frame_header(buf: memoryview, pos: int, length: int, name: str, bad: str) -> Geometry:
    """The geometry of the frame header (SOF) segment whose length field is at ``pos``."""
    n = len(buf)
    if pos + length > n:
        raise IncompleteHeader(f"{name} frame header at byte {pos} ends past byte {n}.", bad)
    if length < 8:
        raise CodestreamError(f"{name} frame header at byte {pos} is {length} bytes long.", bad)
    precision, rows, columns, comps = buf[pos + 2], _u16(buf, pos + 3), _u16(buf, pos + 5), buf[pos + 7]
    if length != 8 + 3 * comps or comps == 0 or not 2 <= precision <= 16:
        raise CodestreamError(f"{name} frame header at byte {pos} is malformed.", bad)
    if rows == 0 or columns == 0:
        raise CodestreamError(
            f"{name} frame header declares a height or width of 0 (set later in the stream); not supported.",
            f"Frame {name} header has no height or width",
        )
    return Geometry(rows, columns, comps, precision)


def _jpeg_check_segment(buf: memoryview, pos: int, marker: int, jpeg_ls: bool, name: str, bad: str) -> None:
    """Refuse a segment other than the frame header that would change how a decoder sizes its output."""
    if marker in _OTHER_SOF or (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
        raise CodestreamError(
            f"{name} frame header 0xFF{marker:02X} is of a process this transfer syntax does not allow.",
            f"Frame is not a {name} process this syntax allows",
        )
    if marker == _JPEG_LSE and jpeg_ls:
        if pos + 3 > len(buf):
            raise IncompleteHeader(f"{name} LSE segment at byte {pos} ends past byte {len(buf)}.", bad)
        if buf[pos + 2] == 4:  # oversize image dimension: sizes a decoder would take from here
            raise CodestreamError(
                f"{name} oversize-dimension (LSE) segment is not supported.",
                f"Frame {name} header has an oversize dimension",
            )


def _siz(buf: memoryview, pos: int) -> Geometry:
    """The geometry of a JPEG 2000 codestream starting at ``pos`` (SOC, then SIZ)."""
    bad = "Frame JPEG 2000 header cannot be read"
    n = len(buf)
    if pos + 4 > n:
        raise IncompleteHeader(f"JPEG 2000 codestream ends at byte {n} before its SIZ marker.", bad)
    if bytes(buf[pos : pos + 4]) != _J2K_START:
        raise CodestreamError("JPEG 2000 codestream does not start with SOC and SIZ markers.", bad)
    lsiz = _u16(buf, pos + 4)
    if lsiz < 41 or (lsiz - 38) % 3:
        raise CodestreamError(f"JPEG 2000 SIZ segment is {lsiz} bytes long.", bad)
    if pos + 4 + lsiz > n:
        raise IncompleteHeader(f"JPEG 2000 SIZ segment ends past byte {n}.", bad)
    _rsiz, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz = struct.unpack_from(">HIIIIIIIIH", buf, pos + 6)
    if csiz == 0 or lsiz != 38 + 3 * csiz:
        raise CodestreamError(f"JPEG 2000 SIZ segment of {lsiz} bytes declares {csiz} components.", bad)
    if xsiz <= xo or ysiz <= yo:
        raise CodestreamError("JPEG 2000 SIZ segment declares an empty image.", bad)
    if xt == 0 or yt == 0 or xto > xo or yto > yo or xto + xt <= xo or yto + yt <= yo:
        raise CodestreamError("JPEG 2000 SIZ segment declares an invalid tiling.", bad)
    tiles = -(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt)
    if tiles > _J2K_MAX_TILES:
        raise CodestreamError(f"JPEG 2000 SIZ segment declares {tiles} tiles (at most {_J2K_MAX_TILES}).", bad)
    bits = 0
    for c in range(csiz):
        ssiz, xr, yr = buf[pos + 42 + 3 * c], buf[pos + 43 + 3 * c], buf[pos + 44 + 3 * c]
        if xr == 0 or yr == 0:
            raise CodestreamError("JPEG 2000 SIZ segment declares a component subsampling of 0.", bad)
        bits = max(bits, (ssiz & 0x7F) + 1)
    return Geometry(ysiz - yo, xsiz - xo, csiz, bits)


def j2k_header(data: bytes | bytearray | memoryview) -> Geometry:
    """The frame geometry a JPEG 2000 codestream (or JP2 file) declares.

    A raw codestream: its SIZ marker segment (image minus offset, components,
    the largest component precision; the tiling is checked too). A JP2
    file: the box structure up to the ``jp2c`` box, whose codestream's SIZ
    is read; the ``ihdr`` box, when present, may not declare more.

    Raises
    ------
    CodestreamError
        The header is malformed or incomplete.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    if bytes(buf[: len(_JP2_SIGNATURE)]) != _JP2_SIGNATURE:
        return _siz(buf, 0)
    bad = "Frame JP2 header cannot be read"
    n, pos, ihdr = len(buf), len(_JP2_SIGNATURE), None
    for _ in range(64):
        if pos + 8 > n:
            raise IncompleteHeader(f"JP2 file ends at byte {n} before its codestream box.", bad)
        size, kind = struct.unpack_from(">I4s", buf, pos)
        head = 8
        if size == 1:
            if pos + 16 > n:
                raise IncompleteHeader(f"JP2 box header at byte {pos} ends past byte {n}.", bad)
            (size,) = struct.unpack_from(">Q", buf, pos + 8)
            head = 16
        if kind == b"jp2c":
            siz = _siz(buf, pos + head)
            if ihdr is None:
                return siz
            return Geometry(*(max(a, b) for a, b in zip(
                (siz.rows, siz.columns, siz.samples, siz.bits), (ihdr.rows, ihdr.columns, ihdr.samples, ihdr.bits)
            )))
        if size == 0 or size < head:
            raise CodestreamError(f"JP2 box at byte {pos} has length {size} before the codestream box.", bad)
        if kind == b"jp2h":
            sub = pos + head
            if sub + 22 > n:
                raise IncompleteHeader(f"JP2 header box ends past byte {n}.", bad)
            sub_size, sub_kind = struct.unpack_from(">I4s", buf, sub)
            if sub_kind != b"ihdr" or sub_size != 22:
                raise CodestreamError("JP2 header box does not start with an image header box.", bad)
            height, width, comps, bpc = struct.unpack_from(">IIHB", buf, sub + 8)
            ihdr = Geometry(height, width, comps, (bpc & 0x7F) + 1 if bpc != 0xFF else 1)
        pos += size
    raise CodestreamError("JP2 file has more than 64 boxes before its codestream.", bad)


def rle_header(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """The segment offsets of an RLE Lossless frame's 64-byte header (PS3.5 G.5).

    Checks: 1 to 15 segments, the first at byte 64, offsets increasing, the
    unused ones 0.

    Raises
    ------
    CodestreamError
        The header is malformed or shorter than 64 bytes.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    bad = "Frame RLE header cannot be read"
    if len(buf) < 64:
        raise IncompleteHeader(f"RLE frame of {len(buf)} bytes is shorter than its 64-byte header.", bad)
    count, *offsets = struct.unpack_from("<16I", buf, 0)
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header declares {count} segments (1 to 15).", bad)
    used = tuple(offsets[:count])
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])):
        raise CodestreamError("RLE header's segment offsets do not start at 64 and increase.", bad)
    if any(offsets[count:]):
        # "All unused segment offsets shall be set to zero" (PS3.5 G.5). pylibjpeg-rle refuses them, and
        # pydicom's fallback decoder would then expand the segments with no bound.
        raise CodestreamError("RLE header has a nonzero offset for an unused segment.", bad)
    return used


def looks_like_frame_start(kind: str, head: bytes | bytearray | memoryview) -> bool:
    """Whether an encapsulated fragment begins a codestream of ``kind`` (each RLE fragment is a frame)."""
    if kind == "rle":
        return True
    lead = bytes(head[:12])
    if kind in ("jpeg", "jpeg-ls"):
        return lead[:2] == b"\xff\xd8"
    return lead[:4] == _J2K_START or lead == _JP2_SIGNATURE


def check_codestream(
    kind: str, head: bytes | bytearray | memoryview, image: Geometry, frame_length: int, frame: int = 1
) -> None:
    """Refuse a frame whose codestream header cannot be read or declares more than ``image``.

    Parameters
    ----------
    kind : str
        ``jpeg``, ``jpeg-ls``, ``j2k`` or ``rle`` (:data:`CODESTREAM_KINDS`).
    head : bytes-like
        The frame's first bytes (all of it, or enough for its header).
    image : Geometry
        The data set's Rows, Columns, Samples per Pixel and Bits Allocated.
    frame_length : int
        The frame's length in bytes (RLE: its segments must lie within it).
    frame : int
        1-based frame number, for messages.

    Raises
    ------
    FrameGeometryError
        The codestream declares more rows, columns, samples or bits than the data set.
    CodestreamError
        The header is malformed, incomplete, or not of ``kind``.
    """
    name = _KIND_NAMES.get(kind, kind)
    if kind == "rle":
        offsets = rle_header(head)
        expected = image.samples * -(-image.bits // 8)
        if len(offsets) != expected:
            raise FrameGeometryError(
                f"Frame {frame}: its RLE header declares {len(offsets)} segments; Samples per Pixel and "
                f"Bits Allocated of the data set need {expected}.",
                "Frame RLE segments do not match the data set's image",
            )
        if offsets[-1] >= frame_length:
            raise CodestreamError(
                f"Frame {frame}: an RLE segment starts past the end of the frame.", "Frame RLE header cannot be read"
            )
        return
    if kind in ("jpeg", "jpeg-ls"):
        declared = jpeg_header(head, jpeg_ls=kind == "jpeg-ls")
    elif kind == "j2k":
        declared = j2k_header(head)
    else:
        raise CodestreamError(f"No codestream reader for {kind!r}.", "Compressed transfer syntax not supported")
    if not declared.fits_in(image):
        raise FrameGeometryError(
            f"Frame {frame}: its {name} header declares {declared.rows} x {declared.columns} pixels of "
            f"{declared.samples} samples of {declared.bits} bits, more than the data set's Rows x Columns "
            f"{image.rows} x {image.columns} of {image.samples} samples of {image.bits} bits.",
            "Frame codestream is larger than the data set's image",
        )


def _rle_plugin() -> str:
    """``pylibjpeg`` when pylibjpeg-rle can decode RLE (bounded output), else pydicom's choice."""
    try:
        from pydicom.pixels.decoders import RLELosslessDecoder

        return "pylibjpeg" if "pylibjpeg" in RLELosslessDecoder.available_plugins else ""
    except Exception:  # noqa: BLE001 - any failure: leave the choice to pydicom  # pragma: no cover
        return ""


def _check_encoded_frame(ds: Dataset, index: int, kind: str) -> None:
    """Check the header of the exact bytes pydicom will hand the decoder for frame ``index``."""
    try:
        opts = as_pixel_options(ds)
        image = Geometry(int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel), int(ds.BitsAllocated))
        eot = opts.get("extended_offsets")
        if eot and len(eot[0]) != len(eot[1]):
            eot = None  # pydicom ignores a mismatched table too
        encoded = get_frame(ds.PixelData, index, number_of_frames=opts["number_of_frames"], extended_offsets=eot)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; one translation here
        raise DataError(
            f"Cannot find the encoded bytes of frame {index + 1} (transfer syntax {_transfer_syntax(ds)}): "
            f"{type(exc).__name__}."
        ) from exc
    check_codestream(kind, encoded, image, len(encoded), frame=index + 1)


def number_of_frames(ds: Dataset) -> int:
    """``NumberOfFrames`` (1 when absent)."""
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _transfer_syntax(ds: Dataset) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?"))


def _has_pixels(ds: Dataset) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"Instance of SOP class {getattr(ds, 'SOPClassUID', '?')} has no pixel data.")


def decode_frame(ds: Dataset, index: int) -> np.ndarray:
    """One decoded frame, ``[H, W]`` or ``[H, W, 3]`` (``index`` is 0-based); raises :class:`DataError`.

    Only that frame is decoded and held (pydicom's ``pixel_array(ds, index=...)``).
    A compressed frame's codestream header is checked first
    (:func:`check_codestream`): :class:`FrameGeometryError` when it declares
    more than the data set's image, :class:`CodestreamError` when it cannot
    be read; nothing is decoded then.

    Examples
    --------
    >>> from pydicom import examples
    >>> decode_frame(examples.ct, 0).shape
    (128, 128)
    """
    _has_pixels(ds)
    n = number_of_frames(ds)
    if not 0 <= index < n:
        raise DataError(f"Frame index {index} is outside the instance's {n} frame(s).")
    ts = _transfer_syntax(ds)
    kind = CODESTREAM_KINDS.get(ts)
    if kind is not None:
        _check_encoded_frame(ds, index, kind)  # before the decoder sizes its output from the codestream
    try:
        arr = pixel_array(ds, index=index, decoding_plugin=_rle_plugin() if ts == _RLE_UID else "")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; we translate once here
        raise DataError(f"Cannot decode frame {index + 1} (transfer syntax {ts}): {type(exc).__name__}.") from exc
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if arr.ndim != (2 if spp == 1 else 3):
        raise DataError(f"Decoded frame has unexpected shape {list(arr.shape)}.")
    return arr


def decode_frames(ds: Dataset) -> np.ndarray:
    """Decoded pixel array of all frames, ``[F, H, W(, 3)]``; raises :class:`DataError`.

    Every compressed frame's codestream header is checked first, as in :func:`decode_frame`.
    """
    _has_pixels(ds)
    kind = CODESTREAM_KINDS.get(_transfer_syntax(ds))
    if kind is not None:
        for i in range(number_of_frames(ds)):
            _check_encoded_frame(ds, i, kind)
    try:
        arr = pixel_array(ds, decoding_plugin=_rle_plugin() if _transfer_syntax(ds) == _RLE_UID else "")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; we translate once here
        raise DataError(f"Cannot decode pixel data (transfer syntax {_transfer_syntax(ds)}): {type(exc).__name__}.") from exc
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if number_of_frames(ds) == 1:
        arr = arr[None]
    if spp == 1 and arr.ndim != 3:
        raise DataError(f"Decoded pixel array has unexpected shape {list(arr.shape)}.")
    return arr


def frame_to_array(ds: Dataset, frame: np.ndarray, apply_window: bool = False) -> np.ndarray:
    """One decoded frame in modality units, ready for :func:`edge.inference.preprocess.preprocess`.

    - ``PALETTE COLOR`` is expanded to RGB through the palette.
    - ``YBR_*`` arrives as RGB (pydicom converts on decode).
    - ``MONOCHROME1`` is inverted so that higher always means brighter.
    - Rescale slope/intercept (modality LUT) is applied, e.g. CT to HU.
    - With ``apply_window``, the dataset's own VOI window/LUT is applied.

    Returns float32 for grayscale (``[H, W]``) and uint8/uint16 RGB ``[H, W, 3]``.
    """
    pi = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pi == "PALETTE COLOR":
        return _lut("palette", lambda: np.asarray(apply_color_lut(frame, ds)))
    if frame.ndim == 3:
        return frame  # RGB (YBR already converted by pydicom)
    out = _lut("modality LUT (rescale)", lambda: apply_modality_lut(frame, ds).astype(np.float32, copy=False))
    if apply_window and ("WindowCenter" in ds or "VOILUTSequence" in ds):
        out = _lut("VOI LUT (window)", lambda: np.asarray(apply_voi_lut(out, ds), dtype=np.float32))
    if pi == "MONOCHROME1":
        out = np.float32(out.max() + out.min()) - out
    return out


def _lut(what: str, apply: Callable[[], np.ndarray]) -> np.ndarray:
    """``apply()``, with a broken LUT or rescale (a non-numeric slope, a short palette) or a
    non-finite result (a slope of 1e308) as :class:`DataError` naming ``what``, never the values.

    Examples
    --------
    >>> _lut("palette", lambda: np.zeros(2)).tolist()
    [0.0, 0.0]
    """
    try:
        with np.errstate(all="ignore"):
            out = apply()
    except MemoryError:
        raise  # not the instance's fault
    except Exception as exc:  # noqa: BLE001 - pydicom and numpy raise many types; translated once here
        raise DataError(f"The {what} of the instance cannot be applied: {type(exc).__name__}.") from exc
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise DataError(f"The {what} of the instance gives values that are not finite.")
    return out


def iter_frames(ds: Dataset, stride: int = 1, apply_window: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_number, array)`` (1-based numbers as DICOM counts) every ``stride`` frames."""
    if stride < 1:
        raise DataError(f"Frame stride {stride} is not >= 1.")
    for i in range(0, number_of_frames(ds), stride):
        yield i + 1, frame_to_array(ds, decode_frame(ds, i), apply_window=apply_window)
