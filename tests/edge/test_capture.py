"""Capture ingest: reading, pacing, cropping and converting video, and ``[[capture]]`` in the daemon.

The videos are made here (:mod:`tests.edge._capture_media`: H.264, or MJPEG
where PyAV has no libx264). The daemon runs in-process with the fixture
model ``tiny-seg`` (its mask is the pixels brighter than the middle of the
frame's range, so the mask of a known picture is known).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.edge._capture_media import (
    BRIGHT, DARK, SPLIT_X, codec, encode, need_pyav, png_bomb, split_cine, split_frames, ultrasound_frames,
)
from tests.conftest import wait_until

from edge.config import CaptureConfig, load_config
from edge.daemon import Daemon
from edge.errors import ProtocolError
from edge.ingest.capture import CaptureSource
from edge.ingest.capture_frames import (
    Captured, FrameConverter, FrameStream, Pacer, SourceUnavailable, decoder_max_pixels, describe_source,
    source_kind,
)
from edge.tools.daemon_process import free_port
from edge.ops.metrics import Metrics
from edge.types import InferenceResult
from edge.tools.zmq_client import ZmqClient, ZmqSubscriber

MISSING_DEVICE = "/dev/video-medge-test-absent"


@pytest.fixture(autouse=True)
def _pyav() -> None:
    need_pyav()


def _cap(source: str | Path, **kw: Any) -> CaptureConfig:
    return CaptureConfig(name=kw.pop("name", "cap"), source=str(source), **kw)


def _drain(stream: FrameStream, limit: int = 10_000) -> list[np.ndarray]:
    out = []
    for item in stream:
        out.append(item.image)
        if len(out) >= limit:
            break
    return out


# ----------------------------------------------------------------------------- units
def test_source_kinds() -> None:
    assert source_kind("/dev/video0") == "device"
    assert source_kind("rtsp://10.0.0.2:554/live") == "url"
    assert source_kind("/srv/cine.mp4") == "file"


def test_pacer_at_a_fixed_rate_restarts_its_clock_when_late() -> None:
    p = Pacer(fps=10.0, kind="file")
    assert p.due(None, now=100.0) == 100.0
    assert p.due(None, now=100.01) == pytest.approx(100.1)
    assert p.due(None, now=100.02) == pytest.approx(100.2)
    # decoding stalled for 2 s: the next frame is due now, not 19 frames in a burst
    assert p.due(None, now=102.2) == 102.2
    assert p.due(None, now=102.21) == pytest.approx(102.3)
    assert Pacer(fps=0.0, kind="file").due(5.0, now=7.0) == 7.0


def test_pacer_follows_source_timestamps_and_a_looped_file() -> None:
    p = Pacer(fps=-1.0, kind="file")
    assert p.due(0.0, now=50.0) == 50.0
    assert p.due(0.5, now=50.01) == pytest.approx(50.5)
    assert p.due(1.0, now=50.02) == pytest.approx(51.0)
    # timestamps went back (the file looped): the clock restarts one frame interval after the last frame
    assert p.due(0.0, now=51.0) == pytest.approx(51.0 + 1 / 30)
    assert p.due(0.04, now=51.001) == pytest.approx(51.04 + 1 / 30)
    assert p.jumps == 0


def test_a_timestamp_jump_forward_restarts_the_clock_and_is_counted() -> None:
    p = Pacer(fps=-1.0, kind="file")
    assert p.ahead_max_s == 1.0
    assert p.due(0.0, now=10.0) == 10.0
    assert p.due(3600.0, now=10.01) == pytest.approx(10.0 + 1 / 30)  # +1 h: not an hour's wait
    assert p.due(3600.04, now=10.02) == pytest.approx(10.04 + 1 / 30)  # the clock goes on from there
    assert p.due(1e300, now=10.03) <= 10.03 + p.ahead_max_s  # beyond threading.TIMEOUT_MAX too
    assert p.jumps == 2
    assert Pacer(fps=0.1, kind="file").ahead_max_s == pytest.approx(20.0)  # two intervals at the slowest rate
    assert Pacer(fps=-1.0, kind="file", fallback_fps=1e-300).fallback_fps == 30.0


def test_a_file_with_a_timestamp_jump_is_not_held_up(tmp_path: Path) -> None:
    pts = list(range(10)) + [i + 3600 * 30 for i in range(10, 20)]  # +1 h after frame 10
    path = encode(tmp_path / f"jump{codec()[1]}", split_frames(20), pts=pts)
    stream = FrameStream(_cap(path))
    ahead = []
    for item in stream:
        ahead.append(item.due - time.monotonic())
    assert len(ahead) == 20 and max(ahead) < stream.pacer.ahead_max_s
    assert stream.errors["timestamp"] == 1 and stream.ended


def test_a_damaged_timestamp_far_ahead_is_bounded_too() -> None:
    times = [i / 30 for i in range(5)] + [11884.0] + [i / 30 for i in range(6, 12)]  # one PTS 3.3 h ahead
    stream = FrameStream(_cap("/srv/x.ts"), opener=lambda source, **kw: _Container([True] * 12, times=times))
    ahead = [item.due - time.monotonic() for item in stream]
    assert len(ahead) == 12 and max(ahead) < stream.pacer.ahead_max_s
    assert stream.errors["timestamp"] == 1


def test_a_looped_one_frame_file_keeps_its_rate(tmp_path: Path) -> None:
    path = split_cine(tmp_path, n=1)
    stream = FrameStream(_cap(path, fps=10.0, loop=True))
    dues = [item.due for item in itertools.islice(stream, 6)]
    assert np.diff(dues) == pytest.approx([0.1] * 5, abs=0.01)  # each reopen continues the clock


def test_pacer_never_delays_a_device_and_thins_it_to_fps() -> None:
    assert Pacer(fps=-1.0, kind="device").due(3.0, now=9.0) == 9.0
    p = Pacer(fps=30.0, kind="device")
    arrivals = [i / 60.0 for i in range(120)]  # a 60 fps card for 2 s
    kept = [t for t in arrivals if p.due(None, now=t) is not None]
    assert 55 <= len(kept) <= 65
    assert all(b - a > 1 / 60 for a, b in zip(kept, kept[1:]))


def _pattern_frame() -> Any:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, 30:] = 255  # right half white, left half black
    rgb[10:20, 5:15] = (200, 30, 60)  # a coloured patch inside the crop below
    return need_pyav().VideoFrame.from_ndarray(rgb, format="rgb24"), rgb


def test_converter_crops_and_converts_known_pixels() -> None:
    frame, rgb = _pattern_frame()
    rgb_out = FrameConverter("rgb", (2, 5, 40, 30), 10_000).convert(frame)
    assert rgb_out.shape == (30, 40, 3) and rgb_out.dtype == np.uint8 and rgb_out.flags.c_contiguous
    assert np.array_equal(rgb_out, rgb[5:35, 2:42])
    gray = FrameConverter("gray", (2, 5, 40, 30), 10_000).convert(frame)
    assert gray.shape == (30, 40) and gray.dtype == np.uint8
    assert gray[0, 0] <= 5 and gray[0, 30] >= 250 and gray[-1, -1] >= 250  # black and white stay so
    assert abs(int(gray[10, 5]) - 84) <= 10  # the patch (200, 30, 60) at its luma, 0.299 R + 0.587 G + 0.114 B
    whole = FrameConverter("gray", (), 10_000).convert(frame)
    assert whole.shape == (40, 60)


def test_converter_refuses_oversize_and_a_crop_that_does_not_fit() -> None:
    conv = FrameConverter("gray", (10, 10, 50, 20), 640 * 480)
    assert conv.refusal(640, 480) == ""
    assert conv.refusal(641, 480) == "oversize"
    assert conv.refusal(55, 40) == "crop"
    with pytest.raises(Exception, match="gray"):
        FrameConverter("bgr", (), 10)


# ----------------------------------------------------------------------------- reading files
def test_a_file_is_read_whole_cropped_and_in_gray(tmp_path: Path) -> None:
    path = split_cine(tmp_path, n=20)
    stream = FrameStream(_cap(path, fps=0.0, crop=(60, 20, 64, 64)))
    images = _drain(stream)
    assert len(images) == 20 and stream.ended and stream.decoded == 20
    assert {im.shape for im in images} == {(64, 64)}
    img = images[10]  # crop x 60: columns 0..19 were dark, 20..63 bright
    assert abs(float(img[:, :16].mean()) - DARK) < 8 and abs(float(img[:, 24:].mean()) - BRIGHT) < 8
    assert stream.errors == dict.fromkeys(("open", "open_timeout", "oversize", "read", "decode", "timestamp"), 0)


def test_an_ultrasound_cine_decodes_close_to_its_frames(tmp_path: Path) -> None:
    src = ultrasound_frames(10)
    path = encode(tmp_path / f"us{codec()[1]}", src)
    images = _drain(FrameStream(_cap(path, fps=0.0)))
    assert len(images) == 10
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() < 12 for a, b in zip(images, src))


def test_rgb_frames_keep_their_colour(tmp_path: Path) -> None:
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, :48] = (220, 30, 30)
    rgb[:, 48:] = (30, 30, 220)
    path = encode(tmp_path / f"rgb{codec()[1]}", [rgb] * 5)
    images = _drain(FrameStream(_cap(path, fps=0.0, color="rgb")))
    assert len(images) == 5 and images[0].shape == (64, 96, 3)
    left, right = images[2][:, :40].reshape(-1, 3).mean(0), images[2][:, 56:].reshape(-1, 3).mean(0)
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]


def test_loop_starts_the_file_again(tmp_path: Path) -> None:
    path = split_cine(tmp_path, n=10)
    stream = FrameStream(_cap(path, fps=0.0, loop=True))
    assert len(_drain(stream, limit=25)) == 25 and not stream.ended


def test_a_file_is_paced_at_its_own_rate(tmp_path: Path) -> None:
    path = split_cine(tmp_path, n=15, fps=30)
    stream = FrameStream(_cap(path))
    dues = [item.due for item in stream]
    assert len(dues) == 15
    steps = np.diff(dues)
    assert np.all(steps > 0) and abs(float(np.median(steps)) - 1 / 30) < 0.005


def _iterate_in_thread(stream: FrameStream) -> threading.Thread:
    t = threading.Thread(target=lambda: _drain(stream), daemon=True)
    t.start()
    return t


def test_a_corrupt_file_is_counted_and_retried_with_backoff(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(20_000))
    stream = FrameStream(_cap(bad), retry_base_s=0.01, retry_max_s=0.02)
    t = _iterate_in_thread(stream)
    wait_until(lambda: stream.errors["open"] >= 3, 10.0, "three failed opens")
    assert stream.status.startswith("down: open") and not stream.up and not stream.ended
    stream.stop()
    t.join(5.0)
    assert not t.is_alive()


def test_damaged_packets_are_skipped_and_the_file_still_plays_to_its_end(tmp_path: Path) -> None:
    path = split_cine(tmp_path, n=60)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 3000] = np.random.default_rng(1).bytes(3000)
    path.write_bytes(bytes(data))
    stream = FrameStream(_cap(path, fps=0.0), retry_base_s=0.01, retry_max_s=0.02)
    t = _iterate_in_thread(stream)
    t.join(20.0)
    assert not t.is_alive() and stream.ended, stream.status  # no endless reopen: the damage was skipped
    assert 20 <= stream.decoded <= 60


class _Packet:
    def __init__(self, good: bool, t: float | None = None) -> None:
        self.good, self.t = good, t

    def decode(self) -> list[Any]:
        av = need_pyav()
        if not self.good:
            raise av.error.InvalidDataError(-1094995529, "Invalid data found when processing input")
        frame = av.VideoFrame.from_ndarray(np.full((16, 16), 128, np.uint8), format="gray")
        if self.t is not None:
            frame.pts, frame.time_base = round(self.t * 90_000), Fraction(1, 90_000)
        return [frame]


class _Container:
    """A source whose packets are given: True decodes to a frame, False does not decode; ``times``: their PTS."""

    def __init__(self, packets: list[bool], times: list[float] | None = None) -> None:
        self.packets, self.times = packets, times or [None] * len(packets)
        self.streams = type("S", (), {"video": [type("V", (), {"average_rate": 30})()]})()

    def demux(self, stream: Any) -> Iterator[_Packet]:
        return (_Packet(g, t) for g, t in zip(self.packets, self.times))

    def close(self) -> None:
        pass


def test_an_undecodable_packet_is_counted_and_skipped() -> None:
    opened: list[str] = []

    def opener(source: str, **kw: Any) -> _Container:
        opened.append(source)
        return _Container([True, False, True, False, False, True])

    stream = FrameStream(_cap("/srv/x.mp4", fps=0.0), opener=opener)
    assert len(_drain(stream)) == 3 and stream.ended
    assert stream.errors == {**dict.fromkeys(stream.errors, 0), "decode": 3} and opened == ["/srv/x.mp4"]


def test_a_source_that_stops_decoding_is_reopened() -> None:
    opens: list[int] = []

    def opener(source: str, **kw: Any) -> _Container:
        opens.append(1)
        return _Container([True] + [False] * 60 if len(opens) == 1 else [True, True])

    stream = FrameStream(_cap("/srv/x.mp4", fps=0.0), opener=opener, retry_base_s=0.01)
    assert len(_drain(stream)) == 3 and stream.ended and len(opens) == 2
    assert stream.errors["read"] == 1 and stream.errors["decode"] == 50  # 50 in a row: reopened


class _RefusingService:
    """Refuses every other frame as a full queue would; answers the rest at once."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def submit(self, image: np.ndarray, **kw: Any) -> None:
        self.calls.append(kw)
        if len(self.calls) % 2 == 0:
            raise ProtocolError("overloaded", "The queue of model 'tiny-seg' is full (64 frames).")
        kw["callback"](InferenceResult(status="ok", model="tiny-seg"))


def test_a_refused_frame_is_counted_and_the_source_goes_on() -> None:
    metrics = Metrics(CollectorRegistry(), process=False, gpu=False)
    reader = FrameStream(_cap("/srv/x.mp4", fps=0.0), opener=lambda source, **kw: _Container([True] * 6))
    service = _RefusingService()
    published: list[str] = []
    src = CaptureSource(_cap("/srv/x.mp4", model="tiny-seg"), service, metrics,  # type: ignore[arg-type]
                        lambda stream, header, payload: published.append(stream), reader=reader).start()
    wait_until(lambda: reader.ended, 10.0, "the end of the file")
    src.close()
    assert src.submitted == 6 and src.refused == 3 and published == ["cap"] * 3 and src.healthy()
    assert {c["source"] for c in service.calls} == {"capture"} and {c["stream"] for c in service.calls} == {"cap"}
    assert all(c["track_e2e"] is False for c in service.calls)  # observed after publishing instead
    value = metrics.registry.get_sample_value
    assert value("medge_requests_failed_total", {"source": "capture", "code": "overloaded"}) == 3
    assert value("medge_end_to_end_seconds_count", {"source": "capture", "model": "tiny-seg"}) == 3
    assert src.status().startswith("ended: end of file after 6 frames")


# ----------------------------------------------------------------------------- bounds
def test_a_stream_declaring_more_than_max_pixels_is_refused_at_open(tmp_path: Path, caplog) -> None:
    path = split_cine(tmp_path, n=5)  # 160 x 120
    stream = FrameStream(_cap(path, fps=0.0, max_pixels=160 * 120 - 1), retry_base_s=0.01, give_up_after=2)
    with caplog.at_level(logging.WARNING), pytest.raises(SourceUnavailable, match="over max_pixels"):
        _drain(stream)
    assert stream.errors["oversize"] == 2 and stream.decoded == 0 and stream.skipped["oversize"] == 0
    assert "refused a .ts file" in caplog.text or "refused a .mkv file" in caplog.text


def test_the_decoder_never_allocates_a_picture_over_max_pixels(tmp_path: Path) -> None:
    av = need_pyav()
    bomb = png_bomb(tmp_path / "bomb.png", 3000)  # 72 MB when decoded, 32 kB on disk
    options: list[dict[str, str]] = []

    def opener(source: str, **kw: Any) -> Any:
        options.append(kw["options"])
        return av.open(source, **kw)

    stream = FrameStream(_cap(bomb, fps=0.0, max_pixels=1000 * 1000), opener=opener)
    assert _drain(stream) == [] and stream.ended
    assert stream.decoded == 0  # FFmpeg refused the picture: it was never decoded (and then skipped)
    assert options == [{"max_pixels": str(decoder_max_pixels(1000 * 1000))}]  # and the probing decoder
    ctx = type("Ctx", (), {"width": 64, "height": 48, "is_open": False, "options": {"threads": "2"}})()
    container = _Container([True])
    container.streams.video[0].codec_context = ctx
    FrameStream(_cap("/srv/x.mp4", max_pixels=5000), opener=lambda source, **kw: container)._open()
    assert ctx.options == {"threads": "2", "max_pixels": str(decoder_max_pixels(5000))}  # before it opens


def test_a_size_change_in_mid_stream_is_not_decoded_past_max_pixels(tmp_path: Path) -> None:
    if codec()[0] != "libx264":
        pytest.skip("needs H.264 in MPEG-TS (files that can be concatenated)")
    small = encode(tmp_path / "a.ts", split_frames(60))  # 2 s: probing at open sees only these
    large = encode(tmp_path / "b.ts", split_frames(8, height=480, width=640))  # over decoder_max_pixels
    both = tmp_path / "both.ts"
    both.write_bytes(small.read_bytes() + large.read_bytes())
    stream = FrameStream(_cap(both, fps=0.0, max_pixels=160 * 120), give_up_after=1)
    images = _drain(stream)
    assert {im.shape for im in images} == {(120, 160)} and len(images) == 60 and stream.ended
    assert stream.decoded == 60 and stream.skipped["oversize"] == 0 and stream.errors["decode"] >= 1


def test_an_open_that_blocks_is_counted_logged_and_shown(caplog) -> None:
    release = threading.Event()

    def opener(source: str, **kw: Any) -> Any:
        release.wait(30.0)
        raise FileNotFoundError(2, "No such file or directory")

    stream = FrameStream(_cap("/srv/fifo.ts"), opener=opener, open_timeout_s=0.05, retry_base_s=0.01)
    with caplog.at_level(logging.WARNING):
        t = _iterate_in_thread(stream)
        wait_until(lambda: stream.errors["open_timeout"] == 1, 10.0, "the open watchdog")
        assert stream.status.startswith("down: open_timeout: blocked opening the source")
        src = CaptureSource(_cap("/srv/fifo.ts"), _RefusingService(), reader=stream)  # type: ignore[arg-type]
        assert src.status().startswith("down: open_timeout: blocked opening")
        stream.stop()
        release.set()
        t.join(5.0)
    assert not t.is_alive() and stream.errors["open_timeout"] == 1  # once per open, not once per poll
    assert caplog.text.count("has not returned after") == 1


def test_a_far_future_frame_never_overflows_the_wait() -> None:
    service = _RefusingService()
    reader = FrameStream(_cap("/srv/x.mp4"), opener=lambda source, **kw: _Container([]))
    src = CaptureSource(_cap("/srv/x.mp4", model="tiny-seg"), service, reader=reader)  # type: ignore[arg-type]
    t0 = time.monotonic()
    src._submit(Captured(np.zeros((8, 8), np.uint8), time.monotonic() + 1e300, 0))  # no OverflowError
    assert time.monotonic() - t0 < reader.pacer.ahead_max_s + 1.0 and len(service.calls) == 1


def test_sources_are_described_without_credentials_or_paths() -> None:
    assert describe_source("rtsp://user:s3cretpw@10.1.2.3:8554/Doe_John?token=abc") == "rtsp://10.1.2.3:8554"
    assert describe_source("http://cam.local/live.ts") == "http://cam.local"
    assert describe_source("/dev/video0") == "/dev/video0"
    assert describe_source("/data/Doe_John_1970/Doe_John.MP4") == "a .mp4 file"
    assert describe_source("/data/Doe_John") == "a file"


def test_logs_and_statuses_never_quote_credentials_or_paths(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "Doe_John_19700101"
    folder.mkdir()
    bad = folder / "Doe_John_cine.mp4"
    bad.write_bytes(np.random.default_rng(3).bytes(5000))
    url = f"rtsp://user:s3cretpw@127.0.0.1:{free_port()}/Doe_John?token=t0ken"
    with caplog.at_level(logging.INFO):
        sources = [CaptureSource(_cap(src, name=f"c{i}", model="tiny-seg"), _RefusingService(),  # type: ignore[arg-type]
                                 reader=FrameStream(_cap(src, name=f"c{i}"), retry_base_s=0.01)).start()
                   for i, src in enumerate((url, str(bad)))]
        wait_until(lambda: all(s.reader.errors["open"] >= 1 for s in sources), 10.0, "both sources to fail")
        lines = [s.status() for s in sources]
        for s in sources:
            s.close()
        with pytest.raises(SourceUnavailable) as exc:
            _drain(FrameStream(_cap(url), give_up_after=1))
    text = caplog.text + "\n".join(lines) + str(exc.value)
    assert "rtsp://127.0.0.1:" in text and "a .mp4 file" in text
    for secret in ("s3cretpw", "user:", "t0ken", "Doe_John", str(tmp_path)):
        assert secret not in text, secret


def test_a_missing_device_gives_up_only_when_asked_to(tmp_path: Path) -> None:
    stream = FrameStream(_cap(MISSING_DEVICE), retry_base_s=0.01, retry_max_s=0.02, give_up_after=3)
    with pytest.raises(SourceUnavailable, match="No such file"):
        _drain(stream)
    assert stream.errors["open"] == 3


def test_a_v4l2_device_delivers_frames_where_one_exists() -> None:
    devices = sorted(glob.glob("/dev/video*"))
    if not devices:
        pytest.skip("no /dev/video* device here (try v4l2loopback: docs/operations.md, Capture)")
    stream = FrameStream(_cap(devices[0], fps=-1.0), give_up_after=1)
    got: list[np.ndarray] = []
    t = threading.Thread(target=lambda: got.extend(_drain(stream, limit=3)), daemon=True)
    t.start()
    t.join(15.0)
    stream.stop()
    if not got:
        pytest.skip(f"{devices[0]} delivered no frame in 15 s (a loopback device with no writer?): {stream.status}")
    assert got[0].dtype == np.uint8 and got[0].ndim == 2 and min(got[0].shape) >= 16


# ----------------------------------------------------------------------------- in the daemon
def _daemon_config(tmp_path: Path, engines: Path, captures: str) -> Any:
    path = tmp_path / "medge.toml"
    path.write_text(
        f'engines_dir = "{engines}"\nspool_dir = "{tmp_path / "spool"}"\n'
        '[zmq]\ningest = "tcp://127.0.0.1:*"\npublish = "tcp://127.0.0.1:*"\ndefault_model = "tiny-seg"\n'
        '[metrics]\nport = 0\n[dicom]\nenabled = false\n' + captures,
        encoding="utf-8",
    )
    return load_config(path, env={})


def _scrape(daemon: Daemon) -> dict[str, dict[frozenset, float]]:
    out: dict[str, dict[frozenset, float]] = {}
    for fam in text_string_to_metric_families(generate_latest(daemon.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def _value(scrape: dict[str, dict[frozenset, float]], name: str, **labels: str) -> float:
    return scrape.get(name, {}).get(frozenset(labels.items()), float("nan"))


@pytest.fixture
def capture_daemon(tmp_path: Path, fixture_engines: Path) -> Iterator[Daemon]:
    """Two sources on one file: gray with a crop (stream ``cap``), rgb whole (stream ``cap-rgb``)."""
    path = split_cine(tmp_path, n=30)
    caps = (
        f'[[capture]]\nname = "cap"\nsource = "{path}"\nmodel = "tiny-seg"\nloop = true\nfps = 30\n'
        'crop = [60, 20, 64, 64]\n'
        f'[[capture]]\nname = "cap-rgb"\nsource = "{path}"\nloop = true\ncolor = "rgb"\n'
    )
    with Daemon(_daemon_config(tmp_path, fixture_engines, caps)) as d:
        yield d


def test_results_are_published_as_zmq_results_with_capture_metrics(capture_daemon: Daemon) -> None:
    d = capture_daemon
    assert d.zmq is not None
    with ZmqSubscriber(d.zmq.publish_endpoint, ["cap"]) as sub:
        got = [sub.recv(10.0) for _ in range(6)]
    assert all(p is not None for p in got)
    last = got[-1]
    assert last.stream == "cap"
    hdr = last.reply.header
    assert hdr["status"] == "ok" and hdr["stream"] == "cap" and hdr["model"] == "tiny-seg"
    assert isinstance(hdr["id"], int) and isinstance(hdr["sent_ns"], int) and "timing_us" in hdr
    mask = last.reply.mask
    assert mask is not None and mask.shape == (64, 64)
    # the crop starts at x = 60: its columns 0..19 are dark (background), 20..63 bright (foreground)
    assert mask[:, :16].mean() < 0.05 and mask[:, 24:].mean() > 0.95
    with ZmqSubscriber(d.zmq.publish_endpoint, ["cap-rgb"]) as sub:
        rgb = sub.recv(10.0)
    assert rgb is not None and rgb.reply.mask is not None and rgb.reply.mask.shape == (120, 160)
    assert rgb.reply.mask[:, : SPLIT_X - 4].mean() < 0.05 and rgb.reply.mask[:, SPLIT_X + 4 :].mean() > 0.95
    with ZmqClient(d.zmq.ingest_endpoint) as client:  # ZeroMQ clients are served alongside
        assert client.request(np.zeros((8, 8), np.uint8), model="tiny-seg").status == "ok"
    s = _scrape(d)
    assert _value(s, "medge_frames_received_total", source="capture", model="tiny-seg") >= 7
    assert _value(s, "medge_end_to_end_seconds_count", source="capture", model="tiny-seg") >= 6
    assert _value(s, "medge_capture_up", capture="cap") == 1.0
    assert _value(s, "medge_capture_frames_total", capture="cap") >= 6
    assert _value(s, "medge_requests_failed_total", source="capture", code="overloaded") == 0.0
    assert d.ready and all(": up;" in line for line in d.capture_status())


def test_a_missing_device_and_a_corrupt_file_do_not_stop_the_daemon(tmp_path: Path, fixture_engines: Path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(2).bytes(10_000))
    caps = (f'[[capture]]\nname = "cam"\nsource = "{MISSING_DEVICE}"\n'
            f'[[capture]]\nname = "file"\nsource = "{bad}"\n')
    with Daemon(_daemon_config(tmp_path, fixture_engines, caps)) as d:
        assert d.zmq is not None
        wait_until(lambda: all(c.reader.errors["open"] >= 1 for c in d.captures), 10.0, "both sources to fail")
        assert d.ready and d.not_ready_reason() == ""
        with ZmqClient(d.zmq.ingest_endpoint) as client:
            assert client.request(np.zeros((8, 8), np.uint8), model="tiny-seg").status == "ok"
        s = _scrape(d)
        for name in ("cam", "file"):
            assert _value(s, "medge_capture_up", capture=name) == 0.0
            assert _value(s, "medge_capture_errors_total", capture=name, reason="open") >= 1
        status = d.capture_status()
        assert status[0].startswith("capture cam: down: open: FileNotFoundError")
        assert status[1].startswith("capture file: down: open: InvalidDataError")
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5.0  # the sources' backoff waits do not hold up shutdown


def test_a_30_fps_capture_keeps_the_backlog_bounded(tmp_path: Path, fixture_engines: Path) -> None:
    """The suite's short version of benchmarks/capture_timing.py (60 s there): 3 s of a 30 fps file."""
    path = encode(tmp_path / f"us{codec()[1]}", ultrasound_frames(30, 240, 320))
    caps = f'[[capture]]\nname = "probe"\nsource = "{path}"\nloop = true\n'
    with Daemon(_daemon_config(tmp_path, fixture_engines, caps)) as d:
        src, sched = d.captures[0], d.scheduler
        assert sched is not None
        backlog = sched.policy("tiny-seg").stream_backlog
        depths: list[float] = []

        def sampled() -> bool:
            depths.append(_value(_scrape(d), "medge_queue_depth", model="tiny-seg"))
            return src.submitted >= 90

        t0 = time.monotonic()
        wait_until(sampled, 20.0, "90 captured frames", interval_s=0.05)
        elapsed = time.monotonic() - t0
        pending = sched.pending()
        s = _scrape(d)
    dropped = _value(s, "medge_frames_dropped_total", model="tiny-seg", reason="stream_backlog")
    assert elapsed > 2.0  # paced at the file's 30 fps, not read as fast as it decodes
    assert max(depths) <= backlog and pending <= backlog  # newest wins: the backlog never grows
    assert dropped <= 0.5 * src.submitted


# ----------------------------------------------------------------------------- shutdown with blocked sources
def _fifos(folder: Path, n: int) -> list[Path]:
    paths = [folder / f"fifo{i}" for i in range(n)]
    for p in paths:
        os.mkfifo(p)
    return paths


def _unblock(fifos: list[Path]) -> None:
    """Open each FIFO for writing and close it: a reader blocked in its open gets the end of the file."""
    for p in fifos:
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader (any more)
            pass


def _get(url: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        return resp.status, resp.read().decode()


def test_blocked_sources_share_one_shutdown_wait_and_show_in_healthz(tmp_path: Path, fixture_engines: Path) -> None:
    fifos = _fifos(tmp_path, 6)  # no writer: FFmpeg's open blocks in the kernel
    caps = "".join(f'[[capture]]\nname = "f{i}"\nsource = "{p}"\n' for i, p in enumerate(fifos))
    d = Daemon(_daemon_config(tmp_path, fixture_engines, caps)).start()
    try:
        assert d.health is not None
        wait_until(lambda: all(c.reader.opening for c in d.captures), 10.0, "every source opening")
        code, body = _get(d.health.url + "/healthz")
        assert code == 200 and body.startswith("ok\n")
        assert body.splitlines()[1:] == d.capture_status() and "capture f5: starting;" in body
        t0 = time.monotonic()
        d.close()
        elapsed = time.monotonic() - t0
        assert sorted(d.blocked_captures()) == sorted(f"f{i}" for i in range(6))
        assert elapsed < 2.0  # 0.5 s for all the capture threads together, not 0.5 s each
    finally:
        d.close()
        _unblock(fifos)


def test_end_process_exits_with_the_status_while_a_capture_is_blocked(
    tmp_path: Path, fixture_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.daemon

    exits: list[int] = []

    class _Exited(Exception):
        pass

    def fake_exit(status: int) -> None:
        exits.append(status)
        raise _Exited

    monkeypatch.setattr(edge.daemon.os, "_exit", fake_exit)
    monkeypatch.setattr(edge.daemon.logging, "shutdown", lambda: exits.append(-1))
    fifos = _fifos(tmp_path, 1)
    d = Daemon(_daemon_config(tmp_path, fixture_engines, f'[[capture]]\nname = "f"\nsource = "{fifos[0]}"\n'))
    try:
        d.start()
        wait_until(lambda: d.captures[0].reader.opening, 10.0, "the source opening")
        d.close()
        with pytest.raises(_Exited):
            edge.daemon.end_process(d, 0)
        assert exits == [-1, 0]  # logs flushed, then os._exit(0): no interpreter exit under a blocked thread
    finally:
        d.close()
        _unblock(fifos)
    assert edge.daemon.end_process(Daemon(d.config), 3) == 3  # nothing blocked: a normal return


def test_sigterm_with_captures_blocked_in_ffmpeg_exits_0(tmp_path: Path, fixture_engines: Path) -> None:
    """``medge serve``: a stream that never answers and a FIFO with no writer do not crash the exit (SIGSEGV)."""
    import socket

    from edge.tools.daemon_process import DaemonProcess

    fifos = _fifos(tmp_path, 1)
    with socket.socket() as silent:  # accepts (the kernel does), never sends: FFmpeg polls its interrupt callback
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = free_port()
        caps = (f'[[capture]]\nname = "fifo"\nsource = "{fifos[0]}"\n'
                f'[[capture]]\nname = "tcp"\nsource = "tcp://127.0.0.1:{silent.getsockname()[1]}"\n')
        cfg = tmp_path / "medge.toml"
        cfg.write_text(
            f'engines_dir = "{fixture_engines}"\nspool_dir = "{tmp_path / "spool"}"\n'
            '[zmq]\ningest = "tcp://127.0.0.1:*"\npublish = "tcp://127.0.0.1:*"\ndefault_model = "tiny-seg"\n'
            f'[metrics]\nport = {port}\n[dicom]\nenabled = false\n' + caps, encoding="utf-8")
        daemon = DaemonProcess(cfg, port, tmp_path / "serve.log")
        try:
            daemon.wait_ready(30.0)
            t0 = time.monotonic()
            assert daemon.stop(10.0) == 0, daemon.log_tail(30)
            assert time.monotonic() - t0 < 5.0
        finally:
            if daemon.exit_code is None:
                daemon.stop()
            _unblock(fifos)
    log = (tmp_path / "serve.log").read_text()
    assert "still blocked in the source; exiting (0) without waiting" in log and "medge stopped in" in log
