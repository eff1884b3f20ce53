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
