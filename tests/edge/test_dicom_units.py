"""Unit tests of the DICOM side's building blocks: header scan, routing, assembly, spool, outlines."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread

from edge.egress.dicom_results import mask_outlines
from edge.egress.outbox import RetryPolicy, classify_status
from edge.errors import DataError
from edge.routing import InstanceInfo, Route, Router, SeriesAssembler, SeriesKey, scan_encoded
from edge.spool import InstanceResult, Spool, SpoolFullError, safe_name

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
    from edge.routing import INFLATE_CHUNK_BYTES, ScanLimits, SizeLimitError, inflate_bounded

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

    from edge.routing import SizeLimitError, split_part10
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
    from edge.routing import ScanLimits, SizeLimitError
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
    from edge.routing import MAX_NESTING

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
    from edge.ingest.dicom_pipeline import instance_info_from_file, read_spooled
    from edge.routing import split_part10

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
    from edge.ingest.dicom_pipeline import WorkItem, _FairQueue, _Job

    q = _FairQueue()

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
