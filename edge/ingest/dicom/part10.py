"""DICOM Part 10 files of the spool: written as chunks, read back only after the bounded scan.

The SCP writes a received instance as a Part 10 file (:func:`part10_chunks`:
preamble and ``DICM``, the encoded file meta information, the data set's
bytes as received). Every later read of a spooled file (the pipeline's
workers, recovery at start-up, the finaliser, overlays) goes through
:func:`read_spooled` or :func:`instance_info_from_file`, which first run the
same bounded scan as the SCP (:func:`edge.ingest.dicom.scan.scan_and_inflate`)
on the file's bytes. A deflated data set is inflated by that scan, under its
cap, and pydicom is handed the inflated bytes, so pydicom's own unbounded
inflation never sees a deflate bomb.
"""

from __future__ import annotations

import io
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from edge.ingest.dicom.scan import InstanceInfo, ScanLimits, check_key_uids, scan_and_inflate, split_part10

__all__ = [
    "encode_file_meta",
    "part10_chunks",
    "instance_info_from_file",
    "read_spooled",
]

_PREAMBLE = b"\x00" * 128 + b"DICM"


def encode_file_meta(file_meta: Dataset) -> bytes:
    """File meta information (group 0002) encoded as in a Part 10 file, after the ``DICM`` prefix."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_file_meta_info(buf, file_meta, enforce_standard=True)
    return buf.getvalue()


def part10_chunks(file_meta: Dataset, data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
    """A DICOM Part 10 file as chunks: preamble and ``DICM``, the encoded ``file_meta``, the data set's bytes."""
    return [_PREAMBLE, encode_file_meta(file_meta), data]


def read_spooled(path: Path, limits: ScanLimits | None = None, stop_before_pixels: bool = False) -> Dataset:
    """Read a spooled instance with pydicom, only after it passed the bounded scan.

    The file's bytes are scanned first (:func:`edge.ingest.dicom.scan.scan_and_inflate`:
    structure, inflated size, frames, pixels per frame). A deflated data set
    is inflated by that scan, under its cap, and pydicom gets the inflated
    bytes as Explicit VR Little Endian: pydicom's own ``zlib.decompress``
    (no size cap) never runs on spooled data.

    Raises
    ------
    SizeLimitError
        The instance is over an input bound.
    edge.ingest.dicom.pixels.FrameGeometryError
        A compressed frame's codestream declares more than the data set's image.
    DataError
        The file is not a whole DICOM file (or a codestream header cannot be read).
    OSError
        The file cannot be read.
    """
    raw = path.read_bytes()  # one read: a resend replaces the file by rename, never in place
    ts, offset = split_part10(raw)
    _info, data = scan_and_inflate(memoryview(raw)[offset:], ts, limits)
    if ts != DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(raw), stop_before_pixels=stop_before_pixels)
    meta = FileMetaDataset(read_dataset(io.BytesIO(raw[132:offset]), is_implicit_VR=False, is_little_endian=True))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    encoded = b"".join(part10_chunks(meta, data))
    del raw, data
    return dcmread(io.BytesIO(encoded), stop_before_pixels=stop_before_pixels)


def instance_info_from_file(path: Path, limits: ScanLimits | None = None) -> InstanceInfo:
    """The routing attributes of a spooled file, from the bounded scan (no pydicom decode).

    Raises
    ------
    SizeLimitError, DataError, OSError
        As :func:`read_spooled`.
    edge.ingest.dicom.scan.KeyUidError
        A Study, Series or SOP Instance UID is not a valid UID (a file
        spooled by a version that did not check them).
    """
    raw = path.read_bytes()
    ts, offset = split_part10(raw)
    info = scan_and_inflate(memoryview(raw)[offset:], ts, limits)[0]
    check_key_uids(info)
    return info
