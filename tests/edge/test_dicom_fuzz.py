"""Property tests of the encoded-data walker and the bounded inflater (hypothesis).

For any bytes — random, or a valid data set in one of the four native
transfer syntaxes (implicit VR LE, explicit VR LE, explicit VR BE,
deflated) or in a compressed one (JPEG, JPEG-LS, JPEG 2000, RLE), with
bytes flipped, cut, inserted or repeated — :func:`scan_encoded` either
returns an :class:`InstanceInfo` or raises :class:`DataError` (of which
:class:`SizeLimitError` and the codestream errors are kinds), never
anything else, and never allocates much more than its inflation bound.
The codestream header readers of :mod:`edge.ingest.dicom.pixels` (JPEG/JPEG-LS SOF,
JPEG 2000 SIZ and JP2 boxes, RLE segment table) give a geometry or a
:class:`CodestreamError` for any bytes.

Profiles: ``MEDGE_HYPOTHESIS_PROFILE=ci`` (default, about 200 examples a
test) or ``release`` (about 20,000); e.g.
``MEDGE_HYPOTHESIS_PROFILE=release pytest tests/edge/test_dicom_fuzz.py``.
"""

from __future__ import annotations

import os
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from edge.errors import DataError
from edge.ingest.dicom.pixels import (
    CodestreamError,
    Geometry,
    check_codestream,
    j2k_header,
    jpeg_header,
    rle_header,
)
from edge.ingest.dicom.scan import (
    INFLATE_CHUNK_BYTES,
    InstanceInfo,
    ScanLimits,
    SizeLimitError,
    inflate_bounded,
    scan_encoded,
)
from tests.edge import dicom_factory as f

# Registering a profile again under the same name replaces it (the ZeroMQ fuzz module registers these too).
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("release", max_examples=20_000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("MEDGE_HYPOTHESIS_PROFILE", "ci"))

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
EXPLICIT_BE, DEFLATED = "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
SYNTAXES = (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED)

#: Small bounds so that a generated stream can pass them cheaply.
LIMITS = ScanLimits(max_inflated_bytes=256 << 10, max_frames=64, max_pixels=128 * 128, other_elements_bytes=64 << 10)


def _with_sequence(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = [item, item]
    return ds


def _valid_datasets() -> list[Dataset]:
    rng = np.random.default_rng(0)
    return [
        _with_sequence(f.make_us_single(rng.integers(0, 255, (8, 8), dtype=np.uint8))),
        f.make_us_multiframe(rng.integers(0, 255, (3, 4, 6), dtype=np.uint8)),
        f.make_ct_series(1, size=8)[0],
    ]


DATASETS = _valid_datasets()
# Explicit VR LE encodings (deflated variants are compressed from these after mutation).
PLAIN = {ts: [f.encode_dataset(ds, ts) for ds in DATASETS] for ts in (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE)}


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few flips, a cut, an insertion or a repeated slice."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "length"]))
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "repeat":
            j = draw(st.integers(i, min(len(buf), i + 64)))
            buf[i:i] = buf[i:j] * draw(st.integers(1, 8))
        else:  # a huge or undefined length at some offset
            buf[i : i + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"\xfe\xff\xff\x7f"]))
    return bytes(buf)


def _scan(data: bytes, ts: str) -> InstanceInfo | None:
    """scan_encoded, where only InstanceInfo or DataError may come out; returns None on DataError."""
    try:
        info = scan_encoded(data, ts, LIMITS)
    except DataError:
        return None
    assert isinstance(info, InstanceInfo)
    assert 1 <= info.number_of_frames <= LIMITS.max_frames
    return info


def _peak_of(fn, *args) -> int:
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _allowed_peak(compressed: bytes) -> int:
    # The bound, one inflate step past it (with bytearray over-allocation), and copies of the input.
    return LIMITS.max_inflated_bytes + 3 * INFLATE_CHUNK_BYTES + 4 * len(compressed) + (64 << 10)


@PROFILE
@given(ts=st.sampled_from(SYNTAXES), data=st.binary(max_size=4096))
def test_arbitrary_bytes_give_instance_info_or_data_error(ts: str, data: bytes) -> None:
    _scan(data, ts)


@PROFILE
@given(ts=st.sampled_from((IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE)), which=st.integers(0, len(DATASETS) - 1), d=st.data())
def test_mutated_native_data_sets_give_instance_info_or_data_error(ts: str, which: int, d: st.DataObject) -> None:
    _scan(d.draw(mutated(PLAIN[ts][which])), ts)


@PROFILE
@given(which=st.integers(0, len(DATASETS) - 1), before=st.booleans(), d=st.data())
def test_mutated_deflated_data_sets_stay_within_the_bound(which: int, before: bool, d: st.DataObject) -> None:
    plain = PLAIN[EXPLICIT_LE][which]
    # Mutate the data set and deflate it (a well-formed stream of a broken data set), or mutate the stream.
    data = _deflate(d.draw(mutated(plain))) if before else d.draw(mutated(_deflate(plain)))
    assert _peak_of(_scan, data, DEFLATED) <= _allowed_peak(data)


@PROFILE
@given(
    which=st.integers(0, len(DATASETS) - 1),
    d=st.data(),
    zeros=st.one_of(st.integers(0, 4096), st.sampled_from([(256 << 10) + 1, 300 << 10, 1 << 20, 4 << 20])),
    where=st.sampled_from(["end", "private", "pixels"]),
)
def test_deflated_streams_that_inflate_far_are_refused_within_the_bound(
    which: int, d: st.DataObject, zeros: int, where: str
) -> None:
    plain = d.draw(mutated(PLAIN[EXPLICIT_LE][which]))
    if where == "private":  # a large private element before the image
        blob = b"\x09\x00\x10\x10OB\x00\x00" + zeros.to_bytes(4, "little") + bytes(zeros)
        plain = plain[:8] + blob + plain[8:] if len(plain) > 8 else blob
    elif where == "pixels":  # a Pixel Data element much longer than the image it declares
        plain += b"\xe0\x7f\x10\x00OB\x00\x00" + zeros.to_bytes(4, "little") + bytes(zeros)
    else:
        plain += bytes(zeros)
    data = _deflate(plain)
    assert _peak_of(_scan, data, DEFLATED) <= _allowed_peak(data)
    if len(plain) > LIMITS.max_inflated_bytes + INFLATE_CHUNK_BYTES:
        with pytest.raises(SizeLimitError):
            scan_encoded(data, DEFLATED, LIMITS)


@PROFILE
@given(data=st.binary(max_size=8192))
def test_inflate_bounded_on_arbitrary_bytes(data: bytes) -> None:
    try:
        out = inflate_bounded(data, LIMITS)
    except DataError:
        return
    assert len(out) <= LIMITS.max_inflated_bytes


def test_valid_data_sets_scan_in_every_syntax() -> None:
    """The seeds of the properties above are valid: each scans to its own UIDs."""
    for ts in SYNTAXES:
        for ds in DATASETS:
            info = scan_encoded(f.encode_dataset(ds, ts), ts, LIMITS)
            assert (info.sop_instance_uid, info.series_instance_uid) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)


# --------------------------------------------------------------------------- codestream headers
COMPRESSED = {
    "1.2.840.10008.1.2.4.50": "jpeg",
    "1.2.840.10008.1.2.4.80": "jpeg-ls",
    "1.2.840.10008.1.2.4.90": "j2k",
    "1.2.840.10008.1.2.5": "rle",
}


def _compressed() -> dict[str, tuple[bytes, bytes]]:
    """Per syntax: (the encoded data set of a 2-frame 32 x 48 cine, its first frame's codestream)."""
    from pydicom.encaps import generate_fragments

    out = {}
    for ts in COMPRESSED:
        ds = f.make_compressed_us(ts, rows=32, columns=48, frames=2)
        out[ts] = (f.encode_dataset(ds, EXPLICIT_LE), list(generate_fragments(ds.PixelData))[1])
    return out


ENCODED = _compressed()
IMAGE = Geometry(32, 48, 1, 8)
PREFIXES = [b"", b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\x01\x00\x00\x00\x40\x00\x00\x00"]


def _headers(data: bytes) -> None:
    """Every reader on ``data``: a result of the right kind, or CodestreamError."""
    for read in (jpeg_header, lambda b: jpeg_header(b, jpeg_ls=True), j2k_header):
        try:
            g = read(data)
        except CodestreamError:
            continue
        assert isinstance(g, Geometry) and min(g.rows, g.columns, g.samples, g.bits) >= 1
    try:
        offsets = rle_header(data)
    except CodestreamError:
        pass
    else:
        assert 1 <= len(offsets) <= 15 and offsets[0] == 64
    for kind in set(COMPRESSED.values()):
        try:
            check_codestream(kind, data, IMAGE, len(data))
        except CodestreamError as exc:
            assert 0 < len(exc.comment) <= 64


@PROFILE
@given(prefix=st.sampled_from(PREFIXES), data=st.binary(max_size=2048))
def test_codestream_readers_on_arbitrary_bytes_give_a_geometry_or_codestream_error(prefix: bytes, data: bytes) -> None:
    _headers(prefix + data)


@PROFILE
@given(ts=st.sampled_from(sorted(COMPRESSED)), d=st.data())
def test_codestream_readers_on_mutated_codestreams_give_a_geometry_or_codestream_error(ts: str, d: st.DataObject) -> None:
    _headers(d.draw(mutated(ENCODED[ts][1])))


@PROFILE
@given(ts=st.sampled_from(sorted(COMPRESSED)), d=st.data())
def test_mutated_compressed_data_sets_give_instance_info_or_data_error(ts: str, d: st.DataObject) -> None:
    _scan(d.draw(mutated(ENCODED[ts][0])), ts)


def test_valid_compressed_data_sets_scan_and_their_codestreams_read() -> None:
    """The seeds of the properties above are valid."""
    for ts, kind in COMPRESSED.items():
        data, frame = ENCODED[ts]
        assert scan_encoded(data, ts, LIMITS).number_of_frames == 2
        check_codestream(kind, frame, IMAGE, len(frame))
