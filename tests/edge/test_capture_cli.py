"""``medge capture``: to a running daemon over ZeroMQ, or ``--local``; the overlay video; exit statuses."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tests.edge._capture_media import need_pyav, split_cine

from edge.cli import main
from edge.config import load_config
from edge.daemon import Daemon
from edge.tools.daemon_process import free_port


@pytest.fixture(autouse=True)
def _pyav() -> None:
    need_pyav()


@pytest.fixture
def cine(tmp_path: Path) -> Path:
    return split_cine(tmp_path, n=30)


@pytest.fixture
def daemon(tmp_path: Path, fixture_engines: Path) -> Iterator[Daemon]:
    env = {
        "MEDGE_ENGINES_DIR": str(fixture_engines),
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_METRICS__ENABLED": "false",
        "MEDGE_DICOM__ENABLED": "false",
        "MEDGE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    with Daemon(load_config(None, env=env)) as d:
        yield d


def _summary(out: str) -> dict:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return next(x for x in lines if x["type"] == "summary")


def test_frames_go_to_a_running_daemon_and_a_summary_is_printed(daemon: Daemon, cine: Path, capsys) -> None:
    assert daemon.zmq is not None
    rc = main(["capture", str(cine), "--endpoint", daemon.zmq.ingest_endpoint, "--model", "tiny-seg",
               "--frames", "30", "--fps", "0", "--window", "4", "--json"])
    assert rc == 0
    s = _summary(capsys.readouterr().out)
    assert s["captured"] == 30 and s["sent"] + s["skipped"] == 30
    assert s["ok"] + s["dropped"] == s["sent"] and s["errors"] == 0 and s["timeouts"] == 0
    assert s["latency"]["count"] == s["ok"] > 0
    sched = daemon.scheduler
    assert sched is not None and sched.accepted >= s["sent"]


def test_local_mode_writes_an_overlay_video(tmp_path: Path, fixture_engines: Path, cine: Path, capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGE_ENGINES_DIR", str(fixture_engines))
    out = tmp_path / "overlay.mp4"
    rc = main(["capture", str(cine), "--local", "--model", "tiny-seg", "--frames", "12", "--fps", "0",
               "--crop", "60,20,63,64", "--overlay-out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "summary: 12 captured" in text and "overlay: 12 frames" in text
    with need_pyav().open(str(out)) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == 12 and frames[0].shape == (64, 64, 3)  # padded to an even width
    red = (frames[6][..., 0] > 150) & (frames[6][..., 1] < 110)
    # tiny-seg's mask is the bright part (crop columns 20..62): its outline runs down near column 20
    assert red[8:56, 17:24].any(axis=1).mean() > 0.8 and not red[8:56, 2:14].any()


def test_no_daemon_is_exit_3(cine: Path, capsys) -> None:
    rc = main(["capture", str(cine), "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--connect-timeout-s", "0.3",
               "--frames", "2"])
    assert rc == 3
    assert "No daemon is connected" in capsys.readouterr().err


def test_a_source_that_cannot_be_read_is_exit_1(tmp_path: Path, fixture_engines: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGE_ENGINES_DIR", str(fixture_engines))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    assert main(["capture", str(bad), "--local", "--model", "tiny-seg", "--frames", "2"]) == 1
    assert "Cannot open" in capsys.readouterr().err
    assert main(["capture", str(tmp_path / "absent.mp4"), "--local", "--frames", "2"]) == 1
    assert "is not a file" in capsys.readouterr().err


def test_bad_arguments_are_usage_errors(cine: Path, capsys) -> None:
    for bad in (["--crop", "1,2,3"], ["--crop", "0,0,0,5"], ["--fps", "-3"], ["--fps", "1e-300"], ["--fps", "nan"],
                ["--max-pixels", "-5"], ["--max-pixels", "0"], ["--reply-timeout-s", "nan"],
                ["--duration-s", "nan"], ["--duration-s", "inf"], ["--connect-timeout-s", "-1"],
                ["--window", "0"], ["--frames", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["capture", str(cine), "--local", *bad])
        assert exc.value.code == 2, bad
    # each valid alone, but no frame could ever be used together
    assert main(["capture", str(cine), "--local", "--crop", "0,0,99999,99999"]) == 2
    assert "more pixels than --max-pixels" in capsys.readouterr().err


def test_frames_skipped_at_the_source_are_counted_by_reason(daemon: Daemon, cine: Path, capsys) -> None:
    assert daemon.zmq is not None
    rc = main(["capture", str(cine), "--endpoint", daemon.zmq.ingest_endpoint, "--model", "tiny-seg",
               "--fps", "0", "--crop", "0,0,200,200", "--json"])  # fits max_pixels, not the 160x120 frames
    out = capsys.readouterr()
    s = _summary(out.out)
    assert rc == 1 and s["captured"] == 0 and s["sent"] == 0
    assert s["unused"] == {"oversize": 0, "crop": 30, "rate": 0}
    assert "no decoded frame could be used (crop 30)" in out.err
    rc = main(["capture", str(cine), "--endpoint", daemon.zmq.ingest_endpoint, "--model", "tiny-seg",
               "--fps", "0", "--max-pixels", str(160 * 120 - 1)])  # refused at open: the file fails
    assert rc == 1 and "over max_pixels" in capsys.readouterr().err


def test_duration_ends_a_wait_for_a_frame_far_ahead() -> None:
    from edge.ingest.capture_frames import Captured
    from edge.tools.capture_client import run_capture

    class Frames:
        skipped = {"oversize": 0, "crop": 0, "rate": 0}

        def __iter__(self):
            yield Captured(np.zeros((8, 8), np.uint8), time.monotonic(), 0)
            yield Captured(np.zeros((8, 8), np.uint8), time.monotonic() + 3600.0, 1)  # an hour ahead

        def stop(self) -> None:
            pass

    class Transport:
        def send(self, image: np.ndarray, req_id: int) -> None:
            pass

        def poll(self, timeout_s: float) -> list:
            threading.Event().wait(timeout_s)  # as a transport waits for replies; none come
            return []

        def close(self) -> None:
            pass

    t0 = time.monotonic()
    stats = run_capture(Frames(), Transport(), duration_s=0.3, reply_timeout_s=0.1)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 2.0 and stats.captured == 1 and stats.timeouts == 1


def test_the_source_is_named_without_its_path(tmp_path: Path, fixture_engines: Path, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGE_ENGINES_DIR", str(fixture_engines))
    folder = tmp_path / "Doe_John_19700101"
    folder.mkdir()
    good = split_cine(folder, n=3)
    bad = folder / "Doe_John.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    assert main(["capture", str(good), "--local", "--model", "tiny-seg", "--frames", "2", "--fps", "0"]) == 0
    assert main(["capture", str(bad), "--local", "--model", "tiny-seg", "--frames", "2"]) == 1
    assert main(["capture", str(folder / "absent.mp4"), "--local", "--frames", "2"]) == 1
    out = capsys.readouterr()
    assert "medge capture: a .ts file" in out.out or "medge capture: a .mkv file" in out.out
    assert "Cannot open a .mp4 file" in out.err and "Doe_John" not in out.out + out.err
