"""Unit tests of the DICOM side's building blocks: header scan, routing, assembly, spool, outlines."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread

from edge.egress.dicom.outbox import RetryPolicy, classify_status
from edge.egress.dicom.outlines import mask_outlines
from edge.errors import DataError
from edge.ingest.dicom.routing import Route, Router, SeriesAssembler, SeriesKey
from edge.ingest.dicom.scan import InstanceInfo, scan_encoded
from edge.ingest.dicom.spool import InstanceResult, Spool, SpoolFullError, safe_name

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

# One bundled pydicom file per transfer syntax family (never fetched from the network).
SCAN_FILES = [
    "CT_small.dcm",  # Explicit VR LE
    "MR_small_implicit.dcm",  # Implicit VR LE
    "MR_small_bigendian.dcm",  # Explicit VR BE
    "image_dfl.dcm",  # Deflated
    "JPEG2000.dcm",  # JPEG 2000 (encapsulated)
    "SC_rgb_rle.dcm",  # RLE
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
]


def split_file(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, encoded data set after the file meta) of a DICOM file."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    (group_len,) = struct.unpack_from("<I", raw, 132 + 8)
    start = 132 + 12 + group_len
    ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return ts, raw[start:]


@pytest.mark.parametrize("name", SCAN_FILES)
def test_scan_encoded_reads_routing_attributes(name: str) -> None:
    path = TEST_FILES / name
    ts, data = split_file(path)
    info = scan_encoded(data, ts)
    ds = dcmread(path, stop_before_pixels=True)
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.sop_class_uid == ds.SOPClassUID
    assert info.modality == str(ds.get("Modality", ""))
    assert info.series_instance_uid == ds.SeriesInstanceUID


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"])
def test_scan_encoded_refuses_truncated_data(name: str) -> None:
    ts, data = split_file(TEST_FILES / name)
    for cut in (len(data) - 1, len(data) // 2, 40):
        with pytest.raises(DataError):
            scan_encoded(data[:cut], ts)


def test_scan_encoded_refuses_garbage() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DataError):
        scan_encoded(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "1.2.840.10008.1.2.1")
    with pytest.raises(DataError):
        scan_encoded(b"", "1.2.840.10008.1.2")


def test_router_first_match_with_filters() -> None:
    r = Router(
        [
            Route(model="chest-det", modality="DX", body_part="CHEST"),
            Route(model="any-dx", modality="dx"),
            Route(model="us-mf", modality="US", sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1"),
        ]
    )
    assert r.match(InstanceInfo(modality="DX", body_part="chest")) == "chest-det"
    assert r.match(InstanceInfo(modality="DX", body_part="HAND")) == "any-dx"
    assert r.match(InstanceInfo(modality="US", sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1")) == "us-mf"
    assert r.match(InstanceInfo(modality="US", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1")) is None
    assert r.models == {"chest-det", "any-dx", "us-mf"}


def test_series_assembler_waits_for_idle_and_in_flight() -> None:
    now = [0.0]
    a = SeriesAssembler(series_idle_s=5.0, clock=lambda: now[0])
    key = SeriesKey("1.2", "1.2.3", "m")
    a.announce(key)
    a.announce(key)
    a.add(key, Path("a.dcm"))
    now[0] = 100.0
    assert a.due() == []  # one instance still in flight
    a.add(key, Path("b.dcm"))
    now[0] = 103.0
    assert a.due() == []  # not idle long enough
    now[0] = 105.1
    (s,) = a.due()
    assert s.paths == [Path("a.dcm"), Path("b.dcm")]
    assert len(a) == 0


def test_spool_store_quota_result_and_quarantine(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000, min_free_bytes=0)
    p = spool.store_instance("1.2.3", [b"x" * 600])
    assert p.read_bytes() == b"x" * 600 and spool.used_bytes == 600
    with pytest.raises(SpoolFullError):
        spool.store_instance("1.2.4", [b"y" * 600])
    assert not (spool.instances_dir / "1.2.4.dcm").exists()
    assert list(spool.tmp_dir.iterdir()) == []
    res = InstanceResult("m", "1", "segmentation", [1, 3], np.ones((2, 4, 5), np.uint8), [[], []])
    spool.save_result(p, res)
    back = spool.load_result(p)
    assert back is not None and back.frames == [1, 3] and np.array_equal(back.masks, res.masks)
    spool.quarantine(p, "decode: broken")
    assert (spool.failed_dir / "1.2.3.dcm").exists()
    assert "broken" in (spool.failed_dir / "1.2.3.reason.txt").read_text()
    assert spool.pending_instances() == [] and spool.load_result(p) is None
    # A new Spool over the same folder finds what is there (the crash-recovery index is the folder).
    spool.store_instance("1.2.5", [b"z"])
    assert [q.name for q in Spool(tmp_path).pending_instances()] == ["1.2.5.dcm"]


def test_spool_cap_counts_extra_bytes_and_recounts_them_before_refusing(tmp_path: Path) -> None:
    outbox = {"bytes": 500, "recounts": 0}

    def extra(recount: bool) -> int:
        if recount:
            outbox["recounts"] += 1
        return outbox["bytes"]

    spool = Spool(tmp_path, max_bytes=1000, min_free_bytes=0, extra_bytes=extra)
    spool.store_instance("1.2.1", [b"x" * 400])  # 400 + 500 <= 1000
    with pytest.raises(SpoolFullError, match="500 in the outbox"):
        spool.store_instance("1.2.2", [b"y" * 200])  # 400 + 500 + 200 > 1000
    assert outbox["recounts"] == 1  # counted again before refusing
    assert not (spool.instances_dir / "1.2.2.dcm").exists() and list(spool.tmp_dir.iterdir()) == []
    outbox["bytes"] = 0  # e.g. dead letters cleared by hand; the cheap count has not seen it yet
    spool.RECOUNT_INTERVAL_S = 0.0
    spool.store_instance("1.2.2", [b"y" * 200])
    assert spool.used_bytes == 600


def test_spool_disk_reserve_refuses_before_writing(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    spool = Spool(tmp_path, min_free_bytes=free + (1 << 30))  # more than the disk has
    with pytest.raises(SpoolFullError, match="below the reserve"):
        spool.store_instance("1.2.3", [b"x"])
    assert list(spool.instances_dir.iterdir()) == [] and list(spool.tmp_dir.iterdir()) == []
    assert Spool(tmp_path / "b", min_free_bytes=0).store_instance("1.2.3", [b"x"]).exists()


def test_safe_name_never_escapes_the_folder() -> None:
    assert safe_name("1.2.840.1") == "1.2.840.1"
    for bad in ("../../etc/passwd", "a/b", "", "1.2.3 "):
        name = safe_name(bad)
        assert "/" not in name and name not in ("", ".", "..")


def _inside(poly: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    x, y = poly[:-1, 0], poly[:-1, 1]
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    res = np.zeros(px.shape, bool)
    for a, b, c, d in zip(x, y, x2, y2):
        if b == d:
            continue
        res ^= ((b > py) != (d > py)) & (px < (c - a) * (py - b) / (d - b) + a)
    return res


def test_mask_outlines_rasterise_back_to_the_mask() -> None:
    rng = np.random.default_rng(7)
    h, w = 40, 50
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(30):
        m = np.zeros((h, w), bool)
        for _k in range(int(rng.integers(1, 4))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 9)
            m |= (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        cover = np.zeros((h, w), int)
        for poly in mask_outlines(m):
            assert np.array_equal(poly[0], poly[-1])
            cover += _inside(poly, xx + 0.5, yy + 0.5)
        assert cover.max() <= 1
        assert np.array_equal(cover > 0, m)


def test_classify_status_and_backoff_bounds() -> None:
    assert classify_status(0x0000) == "success"
    assert classify_status(0xB007) == "success"
    assert classify_status(0xA700) == classify_status(0xA7FF) == "transient"
    assert classify_status(0xA900) == classify_status(0xC210) == classify_status(0x0122) == "permanent"
    p = RetryPolicy(retry_base_s=1.0, retry_max_s=10.0)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5, 50)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_scan_encoded_refuses_native_pixel_data_shorter_than_the_image() -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from tests.edge.dicom_factory import make_us_single

    ds = make_us_single(np.zeros((16, 16), np.uint8))
    ds.PixelData = bytes(200)  # re-encoded with a consistent length, but 256 bytes are needed
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    with pytest.raises(DataError, match="truncated"):
        scan_encoded(buf.getvalue(), "1.2.840.10008.1.2.1")
    ds.PixelData = bytes(256)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    assert scan_encoded(buf.getvalue(), "1.2.840.10008.1.2.1").sop_instance_uid == ds.SOPInstanceUID


# --------------------------------------------------------------------------- input bounds (hardening)
def _deflate(data: bytes) -> bytes:
    import zlib

    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _explicit_le(*elements: tuple[int, bytes, bytes]) -> bytes:
    """Explicit VR LE elements (tag, VR, value), long-VR headers where the standard says."""
    out = b""
    for tag, vr, value in elements:
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            out += struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
        else:
            out += struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return out


_UIDS = ((0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.7\x00"), (0x00080018, b"UI", b"1.2.3.4\x00"))


def test_inflate_bounded_refuses_past_its_bound_and_tells_corrupt_from_too_big() -> None:
    from edge.ingest.dicom.scan import INFLATE_CHUNK_BYTES, ScanLimits, SizeLimitError, inflate_bounded

    # 3 MiB of private data, no image: everything counts as "other elements".
    data = _explicit_le(*_UIDS, (0x00091010, b"OB", bytes(3 << 20)))
    with pytest.raises(SizeLimitError, match=r"max_inflated_mb") as info:
        inflate_bounded(_deflate(data), ScanLimits(other_elements_bytes=1 << 20))
    assert info.value.key == "max_inflated_mb" and len(info.value.comment) <= 64
    with pytest.raises(SizeLimitError):
        inflate_bounded(_deflate(data), ScanLimits(max_inflated_bytes=1 << 20))
    assert len(inflate_bounded(_deflate(data), ScanLimits(other_elements_bytes=4 << 20))) == len(data)
    # Corrupt and truncated deflate streams are "cannot understand", not "too big".
    good = _deflate(data)
    for broken in (b"\xff" * 64, good[: len(good) // 2]):
        with pytest.raises(DataError) as err:
            inflate_bounded(broken)
        assert not isinstance(err.value, SizeLimitError)
    assert INFLATE_CHUNK_BYTES <= 1 << 20


def test_deflate_bomb_is_refused_at_its_pixel_data_header_with_little_memory(tmp_path: Path) -> None:
    import tracemalloc

    from edge.ingest.dicom.scan import SizeLimitError, split_part10
    from tests.edge import dicom_factory as f

    raw = f.write_deflate_bomb(tmp_path / "bomb.dcm", 1024 << 20).read_bytes()
    ts, offset = split_part10(raw)
    tracemalloc.start()
    try:
        with pytest.raises(SizeLimitError, match="declared image of 4096 bytes"):
            scan_encoded(memoryview(raw)[offset:], ts)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # one inflate step, not the 32 MiB margin, let alone 1 GiB
    # A bomb whose Pixel Data length is consistent with its small image, but followed by 64 MiB more.
    raw = f.write_deflate_bomb(tmp_path / "tail.dcm", 64 << 20, pixel_length=4096).read_bytes()
    ts, offset = split_part10(raw)
    with pytest.raises(SizeLimitError):
        scan_encoded(raw[offset:], ts)


@pytest.mark.parametrize(
    "ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"]
)
def test_scan_encoded_refuses_frames_and_pixels_over_the_limits(ts: str) -> None:
    from edge.ingest.dicom.scan import ScanLimits, SizeLimitError
    from tests.edge import dicom_factory as f

    cine = f.encode_dataset(f.make_us_multiframe(np.zeros((12, 4, 5), np.uint8)), ts)
    assert scan_encoded(cine, ts, ScanLimits(max_frames=12)).number_of_frames == 12
    with pytest.raises(SizeLimitError, match=r"Number of Frames 12 .*max_frames") as info:
        scan_encoded(cine, ts, ScanLimits(max_frames=11))
    assert info.value.key == "max_frames" and "max_frames" in info.value.comment
    with pytest.raises(SizeLimitError, match=r"4 x 5 = 20 pixels .*max_pixels"):
        scan_encoded(cine, ts, ScanLimits(max_pixels=19))
    assert scan_encoded(cine, ts, ScanLimits(max_pixels=20)).sop_class_uid == f.US_MF


def test_scan_refuses_image_attributes_not_encoded_as_us_and_deep_nesting() -> None:
    from edge.ingest.dicom.scan import MAX_NESTING

    rows_ul = _explicit_le(*_UIDS, (0x00280010, b"UL", struct.pack("<I", 70000)))
    with pytest.raises(DataError, match="US needs 2"):
        scan_encoded(rows_ul, "1.2.840.10008.1.2.1")
    # Sequences of undefined length nested MAX_NESTING + 1 deep: refused, no RecursionError.
    depth = MAX_NESTING + 1
    nested = b""
    for _ in range(depth):
        nested = (
            struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + nested
            + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        )
    with pytest.raises(DataError, match="nested deeper"):
        scan_encoded(_explicit_le(*_UIDS) + nested, "1.2.840.10008.1.2.1")


def test_read_spooled_inflates_under_the_bound_and_matches_pydicom(tmp_path: Path) -> None:
    from edge.ingest.dicom.part10 import instance_info_from_file, read_spooled
    from edge.ingest.dicom.scan import split_part10

    path = TEST_FILES / "image_dfl.dcm"
    ts, offset = split_part10(path.read_bytes())
    assert ts == "1.2.840.10008.1.2.1.99" and offset > 132
    ours, theirs = read_spooled(path), dcmread(path)
    assert ours.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # handed to pydicom inflated
    assert np.array_equal(ours.pixel_array, theirs.pixel_array)
    assert instance_info_from_file(path).sop_instance_uid == theirs.SOPInstanceUID
    plain = read_spooled(TEST_FILES / "CT_small.dcm", stop_before_pixels=True)
    assert "PixelData" not in plain and plain.Modality == "CT"


def test_spool_counts_attempts_durably_and_forgets_them_with_the_instance(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    p = spool.store_instance("1.2.3", [b"x" * 10])
    assert spool.attempts(p) == 0
    assert [spool.begin_attempt(p) for _ in range(3)] == [1, 2, 3]
    assert spool.attempts_path(p).read_text().strip() == "3" and spool.pending_instances() == [p]
    spool.undo_attempt(p)
    assert spool.attempts(p) == 2
    spool.clear_attempts(p)
    assert spool.attempts(p) == 0 and not spool.attempts_path(p).exists()
    spool.begin_attempt(p)
    spool.quarantine(p, "max_attempts: test")
    assert not spool.attempts_path(p).exists() and (spool.failed_dir / "1.2.3.dcm").exists()
    q = spool.store_instance("1.2.4", [b"y"])
    spool.begin_attempt(q)
    spool.remove_instances([q])
    assert list(spool.instances_dir.iterdir()) == []
    assert spool.used_bytes == 0


def test_fair_queue_takes_one_turn_per_source() -> None:
    from edge.ingest.dicom.fair_queue import FairQueue
    from edge.ingest.dicom.pipeline import WorkItem, _Job

    q: FairQueue[_Job] = FairQueue()

    def job(name: str) -> _Job:
        return _Job(WorkItem(Path(name), InstanceInfo(), "m"))

    for i in range(4):
        q.put(job(f"a{i}"), "10.0.0.1")
    q.put(job("b0"), "10.0.0.2")
    q.put(job("b1"), "10.0.0.2")
    q.put(job("c0"), "10.0.0.3")
    first = q.get()
    assert first is not None and first.item.path.name == "a0"
    q.put(first, "10.0.0.1", front=True)  # a continuation keeps its place within its source
    order = [q.get().item.path.name for _ in range(len(q))]
    assert order == ["b0", "c0", "a0", "b1", "a1", "a2", "a3"]
    assert q.close() == [] and q.get() is None and not q.put(job("late"), "x")


def test_series_assembler_restore_makes_a_series_due_again_later() -> None:
    now = [0.0]
    a = SeriesAssembler(10.0, clock=lambda: now[0])
    k = SeriesKey("st", "se", "m")
    a.announce(k)
    a.add(k, Path("1.dcm"))
    now[0] = 11.0
    (s,) = a.due()
    a.restore(s)
    assert a.due() == []
    now[0] = 22.0
    (again,) = a.due()
    assert again.paths == [Path("1.dcm")]


# --------------------------------------------------------------------------- nesting, image attributes, codestreams
def _nested_defined(depth: int) -> bytes:
    """``depth`` sequences of defined length, each in the one item of the one above."""
    s = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(s)) + s
        s = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    return s


def test_nesting_limit_applies_to_sequences_of_defined_length_too() -> None:
    from edge.ingest.dicom.scan import MAX_NESTING

    ts = "1.2.840.10008.1.2.1"
    assert scan_encoded(_explicit_le(*_UIDS) + _nested_defined(MAX_NESTING), ts).sop_instance_uid == "1.2.3.4"
    for depth in (MAX_NESTING + 1, 10_000):  # 10,000 was accepted: defined-length items were skipped whole
        with pytest.raises(DataError, match="nested deeper"):
            scan_encoded(_explicit_le(*_UIDS) + _nested_defined(depth), ts)
    # The items of a defined-length sequence are walked now: a truncated element inside one is found.
    inner = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 40) + b"x" * 8
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
    sq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    with pytest.raises(DataError, match="runs past"):
        scan_encoded(_explicit_le(*_UIDS) + sq, ts)


@pytest.mark.parametrize(
    ("attribute", "value", "match"),
    [
        ("Rows", 0, "Rows or Columns is 0"),
        ("Columns", 0, "Rows or Columns is 0"),
        ("BitsAllocated", 0, "Bits Allocated"),
        ("BitsAllocated", 64, "Bits Allocated"),
        ("BitsAllocated", 12, "Bits Allocated"),
        ("SamplesPerPixel", 0, "Samples per Pixel"),
        ("SamplesPerPixel", 4, "Samples per Pixel"),
        ("SamplesPerPixel", None, "no Samples per Pixel"),
        ("Rows", None, "no Rows"),
    ],
)
def test_images_that_could_never_be_decoded_are_refused_by_the_scan(attribute: str, value, match: str) -> None:
    from tests.edge import dicom_factory as f

    ds = f.make_us_single(np.zeros((16, 16), np.uint8))
    if value is None:
        delattr(ds, attribute)
    else:
        setattr(ds, attribute, value)
    with pytest.raises(DataError, match=match) as info:
        scan_encoded(f.encode_dataset(ds, "1.2.840.10008.1.2.1"), "1.2.840.10008.1.2.1")
    assert len(str(info.value)) <= 64  # it is the Error Comment, whole
    # Without Pixel Data (not an image medge would decode) the same attributes are not checked.
    del ds.PixelData
    assert scan_encoded(f.encode_dataset(ds, "1.2.840.10008.1.2.1"), "1.2.840.10008.1.2.1").modality == "US"


_CODECS = [
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (Pillow)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
]


@pytest.mark.parametrize("ts", _CODECS)
def test_codestream_declaring_more_than_rows_x_columns_is_refused_before_decoding(ts: str) -> None:
    import tracemalloc

    from edge.ingest.dicom.pixels import FrameGeometryError, decode_frame
    from tests.edge import dicom_factory as f

    good = f.make_compressed_us(ts, frames=3)
    assert scan_encoded(f.encode_dataset(good, "1.2.840.10008.1.2.1"), ts).number_of_frames == 3
    assert decode_frame(good, 2).shape == (64, 64)
    bomb = f.make_codestream_bomb(ts, declared=60000)  # 64 x 64 data set, 60000 x 60000 codestream
    data = f.encode_dataset(bomb, "1.2.840.10008.1.2.1")
    assert len(data) < 4096
    with pytest.raises(FrameGeometryError) as info:
        scan_encoded(data, ts)
    assert info.value.comment == "Frame codestream is larger than the data set's image"
    # The worker's own check, on the exact bytes the decoder would get: nothing is allocated.
    tracemalloc.start()
    try:
        with pytest.raises(FrameGeometryError):
            decode_frame(bomb, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # 3.6 GB if the decoder had run
    # One pixel too wide or too high: refused too; three components declared in a one-component
    # header does not even parse (its length says one).
    from pydicom.encaps import encapsulate, generate_fragments

    from edge.ingest.dicom.pixels import CodestreamError

    for rows, columns, samples, error in ((64, 65, None, FrameGeometryError), (65, 64, None, FrameGeometryError),
                                          (64, 64, 3, CodestreamError)):
        odd = f.make_compressed_us(ts)
        frame = list(generate_fragments(odd.PixelData))[1]
        odd.PixelData = encapsulate([f.patch_codestream(frame, rows, columns, samples)])
        odd["PixelData"].is_undefined_length = True
        with pytest.raises(error):
            scan_encoded(f.encode_dataset(odd, "1.2.840.10008.1.2.1"), ts)


def _encapsulated_value(fragments: list[bytes], bot: list[int]) -> bytes:
    """The value of encapsulated Pixel Data: Basic Offset Table item, fragment items, delimiter."""
    table = b"".join(struct.pack("<I", o) for o in bot)
    out = struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table
    for frag in fragments:
        out += struct.pack("<HHI", 0xFFFE, 0xE000, len(frag)) + frag
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _encapsulated(fragments: list[bytes], bot: list[int]) -> bytes:
    """Encapsulated Pixel Data (explicit VR LE element) with these fragments and Basic Offset Table."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + _encapsulated_value(fragments, bot)


def test_offset_tables_cannot_smuggle_a_codestream_past_the_fragment_checks() -> None:
    """A Basic Offset Table pointing inside a fragment makes pydicom decode bytes that start no fragment."""
    from pydicom.encaps import generate_fragments
    from pydicom.uid import JPEGBaseline8Bit

    from edge.ingest.dicom.pixels import FrameGeometryError, decode_frame
    from tests.edge import dicom_factory as f

    ts = JPEGBaseline8Bit
    good = f.make_compressed_us(ts)
    frame = list(generate_fragments(good.PixelData))[1]
    bomb = f.patch_codestream(frame, 60000, 60000)
    # Fragment 1 is the honest frame followed by junk that holds a whole fake item with the bomb.
    fake_item = struct.pack("<HHI", 0xFFFE, 0xE000, len(bomb)) + bomb
    first = frame + b"\x00\x00" + fake_item
    hidden_at = 8 + len(frame) + 2  # offset of the fake item from the first fragment's item tag
    head = f.encode_dataset(good, "1.2.840.10008.1.2.1")
    head = head[: head.index(b"\xe0\x7f\x10\x00")]  # everything before Pixel Data
    for bot, ok in (([0], True), ([hidden_at], False), ([3], False)):
        data = head + _encapsulated([first], bot)
        if ok:
            assert scan_encoded(data, ts).number_of_frames == 1
        else:
            with pytest.raises(DataError, match="Basic Offset Table points between fragments"):
                scan_encoded(data, ts)
    # The worker checks the frame pydicom actually extracts, whatever the scan saw.
    smuggled = f.make_compressed_us(ts)
    smuggled.PixelData = _encapsulated_value([first], [hidden_at])
    with pytest.raises(FrameGeometryError):
        decode_frame(smuggled, 0)


def test_rle_segment_table_must_match_the_image_and_use_no_spare_offsets() -> None:
    import tracemalloc

    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    from edge.ingest.dicom.pixels import CodestreamError, FrameGeometryError, decode_frame
    from tests.edge import dicom_factory as f

    ds = f.make_compressed_us(RLELossless, frames=2)
    assert scan_encoded(f.encode_dataset(ds, "1.2.840.10008.1.2.1"), RLELossless).number_of_frames == 2
    segment = b"\x81\x00" * (1 << 19)  # 1 MiB that a PackBits decoder expands to 64 MiB
    cases = [
        (struct.pack("<16I", 2, 64, 100, *[0] * 13) + segment, FrameGeometryError),  # 2 segments, 8-bit mono
        (struct.pack("<16I", 1, 64, 1 << 30, *[0] * 13) + segment, CodestreamError),  # a spare offset
        (struct.pack("<16I", 1, 32, *[0] * 14) + segment, CodestreamError),  # first segment not at 64
        (b"\x01\x00", CodestreamError),  # shorter than the header
    ]
    for frame, error in cases:
        bad = f.make_compressed_us(RLELossless)
        bad.PixelData = encapsulate([frame])
        bad["PixelData"].is_undefined_length = True
        with pytest.raises(error):
            scan_encoded(f.encode_dataset(bad, "1.2.840.10008.1.2.1"), RLELossless)
        tracemalloc.start()
        try:
            with pytest.raises(DataError):
                decode_frame(bad, 0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, peak  # pydicom's fallback decoder expanded the spare-offset case to 64 MiB


def _sof(marker: int, rows: int) -> bytes:
    """A one-component 8-bit frame header of ``rows`` x 64."""
    return struct.pack(">BBHBHHBBBB", 0xFF, marker, 11, 8, rows, 64, 1, 1, 0x11, 0)


def test_unparseable_codestreams_and_encapsulation_in_the_wrong_syntax_are_refused() -> None:
    from pydicom.encaps import encapsulate

    from edge.ingest.dicom.pixels import CodestreamError
    from tests.edge import dicom_factory as f

    for ts, frame in (
        ("1.2.840.10008.1.2.4.50", b"\x00\x01garbage" * 10),  # no SOI
        ("1.2.840.10008.1.2.4.50", b"\xff\xd8\xff\xda\x00\x02"),  # scan before frame header
        ("1.2.840.10008.1.2.4.50", b"\xff\xd8" + _sof(0xC5, 64)),  # hierarchical
        ("1.2.840.10008.1.2.4.50", b"\xff\xd8" + _sof(0xC0, 0) + b"\xff\xda\x00\x02"),  # height 0: set later by DNL
        ("1.2.840.10008.1.2.4.80", b"\xff\xd8" + _sof(0xC0, 64) + b"\xff\xda\x00\x02"),  # JPEG in JPEG-LS
        ("1.2.840.10008.1.2.4.90", b"\xff\x4f\xff\x51\x00\x05"),  # SIZ cut short
        ("1.2.840.10008.1.2.4.90", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 20),  # JP2 with no boxes
    ):
        ds = f.make_compressed_us("1.2.840.10008.1.2.4.50")
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].is_undefined_length = True
        with pytest.raises(CodestreamError) as info:
            scan_encoded(f.encode_dataset(ds, "1.2.840.10008.1.2.1"), ts)
        assert 0 < len(info.value.comment) <= 64
    # Encapsulated pixel data in a native syntax, native in a compressed one: both refused.
    enc = f.make_compressed_us("1.2.840.10008.1.2.4.50")
    with pytest.raises(DataError, match="not a compressed one"):
        scan_encoded(f.encode_dataset(enc, "1.2.840.10008.1.2.1"), "1.2.840.10008.1.2.1")
    native = f.make_us_single(np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="is a compressed one"):
        scan_encoded(f.encode_dataset(native, "1.2.840.10008.1.2.1"), "1.2.840.10008.1.2.4.50")


def test_jp2_wrapped_codestreams_are_read_through_their_boxes() -> None:
    from edge.ingest.dicom.pixels import FrameGeometryError, Geometry, check_codestream, j2k_header
    from tests.edge import dicom_factory as f
    from pydicom.encaps import generate_fragments

    raw = list(generate_fragments(f.make_compressed_us("1.2.840.10008.1.2.4.90").PixelData))[1]

    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(body), kind) + body

    def jp2(codestream: bytes, height: int = 64, width: int = 64) -> bytes:
        ihdr = box(b"ihdr", struct.pack(">IIHBBBB", height, width, 1, 7, 7, 0, 0))
        signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        return signature + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ") + box(b"jp2h", ihdr) + box(b"jp2c", codestream)

    image = Geometry(64, 64, 1, 8)
    assert j2k_header(jp2(raw)) == Geometry(64, 64, 1, 8)
    check_codestream("j2k", jp2(raw), image, len(raw))
    with pytest.raises(FrameGeometryError):  # the codestream inside declares more
        check_codestream("j2k", jp2(f.patch_codestream(raw, 60000, 60000)), image, len(raw))
    with pytest.raises(FrameGeometryError):  # the image header box declares more
        check_codestream("j2k", jp2(raw, 60000, 60000), image, len(raw))


def test_ybr_full_422_uncompressed_is_whole_and_decodes() -> None:
    """pydicom's SC_ybr_full_422_uncompressed.dcm holds 2 bytes a pixel (Y Y Cb Cr per pair), not 3 (issue 10 item 5)."""
    from pathlib import Path as _Path

    from pydicom.data import get_testdata_file

    from edge.ingest.dicom.part10 import read_spooled
    from edge.ingest.dicom.pixels import decode_frames, frame_to_array
    from edge.ingest.dicom.scan import scan_encoded as _scan, split_part10 as _split

    path = _Path(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    raw = path.read_bytes()
    ts, offset = _split(raw)
    info = _scan(raw[offset:], ts)
    assert info.sop_instance_uid
    ds = read_spooled(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    frames = decode_frames(ds)
    img = frame_to_array(ds, frames[0])
    assert img.shape[:2] == (ds.Rows, ds.Columns)
    # One byte short is still truncated.
    with pytest.raises(DataError, match="truncated"):
        _scan(_shorten_pixel_data(raw[offset:], ts), ts)


def _shorten_pixel_data(data: bytes, ts: str) -> bytes:
    """The data set with its (last, native) Pixel Data element one byte shorter, length fixed up."""
    import struct as _struct

    i = data.rfind(b"\xe0\x7f\x10\x00")
    explicit = ts != "1.2.840.10008.1.2"
    if explicit:
        (length,) = _struct.unpack_from("<I", data, i + 8)
        head = data[: i + 8] + _struct.pack("<I", length - 2)
        return head + data[i + 12 : i + 12 + length - 2]
    (length,) = _struct.unpack_from("<I", data, i + 4)
    return data[: i + 4] + _struct.pack("<I", length - 2) + data[i + 8 : i + 8 + length - 2]
