"""``[[capture]]`` configuration: validated at start like every key; PyAV loaded only when a capture is configured.

These tests need no PyAV.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import CaptureConfig, load_config
from edge.daemon import Daemon
from edge.errors import ConfigError
from edge.ingest import capture_frames

ROOT = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, engines: Path, capture: str, extra: str = "") -> tuple[CaptureConfig, ...]:
    path = tmp_path / "medge.toml"
    path.write_text(f'engines_dir = "{engines}"\n{extra}\n[[capture]]\n{capture}\n', encoding="utf-8")
    return load_config(path, env={}).capture


def test_defaults_fill_in_model_and_stream(tmp_path: Path, fixture_engines: Path) -> None:
    (c,) = _load(tmp_path, fixture_engines, 'name = "room-1"\nsource = "/dev/video0"',
                 '[zmq]\ndefault_model = "tiny-det"')
    assert (c.model, c.stream, c.color, c.fps, c.loop, c.crop) == ("tiny-det", "room-1", "gray", -1.0, False, ())
    (c,) = _load(tmp_path, fixture_engines,
                 'name = "f"\nsource = "rtsp://10.0.0.7/live"\nmodel = "tiny-seg"\nstream = "probe-2"\n'
                 'crop = [1, 2, 30, 40]\ncolor = "rgb"\nfps = 25\nloop = true')
    assert (c.model, c.stream, c.crop, c.color, c.fps) == ("tiny-seg", "probe-2", (1, 2, 30, 40), "rgb", 25.0)


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ('name = "a b"\nsource = "/dev/video0"', "capture[0].name", "not a plain name"),
        ('name = "a"\nsource = "cine.mp4"', "capture[0].source", "absolute file path"),
        ('name = "a"\nsource = "/dev/video0"\ncrop = [1, 2, 3]', "capture[0].crop", "[x, y, w, h]"),
        ('name = "a"\nsource = "/dev/video0"\ncrop = [-1, 0, 3, 3]', "capture[0].crop", "x and y must be >= 0"),
        ('name = "a"\nsource = "/dev/video0"\ncrop = [0, 0, 0, 3]', "capture[0].crop", "w and h must be >= 1"),
        ('name = "a"\nsource = "/dev/video0"\ncolor = "bgr"', "capture[0].color", "not one of"),
        ('name = "a"\nsource = "/dev/video0"\nfps = -2', "capture[0].fps", "must be -1"),
        ('name = "a"\nsource = "/dev/video0"\nfps = 1e-300', "capture[0].fps", "from 0.1 to 1000"),
        ('name = "a"\nsource = "/dev/video0"\nfps = 0.05', "capture[0].fps", "from 0.1 to 1000"),
        ('name = "a"\nsource = "/dev/video0"\nfps = nan', "capture[0].fps", "must be -1"),
        ('name = "a"\nsource = "rtsp://u:s3cret@h/Doe_John"\nfps = inf', "capture[0].fps", "must be -1"),
        ('name = "a"\nsource = "Doe_John/cine.mp4"', "capture[0].source", "absolute file path"),
        ('name = "a"\nsource = "/dev/video0"\nmodel = "nope"', "capture[0].model", "not a served model"),
        ('name = "a"\nsource = "/dev/video0"\nstream = "x\\u0001"', "capture[0].stream", "stream name"),
        ('name = "a"\nsource = "/dev/video0"\nmax_pixels = 0', "capture[0].max_pixels", ">= 1"),
        ('name = "a"\nsource = "/dev/video0"\nvideo_size = "big"', "capture[0].video_size", "WIDTHxHEIGHT"),
        ('name = "a"\nsource = "/dev/video0"\ninput_format = "a b"', "capture[0].input_format", "format name"),
        ('name = "a"\nsource = "/dev/video0"\nfsp = 3', "capture[0].fsp", "Unknown config key"),
        ('name = "a"\nsource = "/dev/video0"\n[[capture]]\nname = "a"\nsource = "/dev/video1"',
         "capture[1].name", "listed twice"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, fixture_engines: Path, body: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, fixture_engines, body)
    assert key in str(exc.value) and problem in str(exc.value)
    assert "s3cret" not in str(exc.value) and "Doe_John" not in str(exc.value)


def test_a_capture_without_pyav_is_a_clear_start_up_error(tmp_path: Path, fixture_engines: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    path = tmp_path / "medge.toml"
    path.write_text(
        f'engines_dir = "{fixture_engines}"\nspool_dir = "{tmp_path / "spool"}"\n'
        '[zmq]\ningest = "tcp://127.0.0.1:*"\npublish = "tcp://127.0.0.1:*"\n[metrics]\nport = 0\n'
        '[dicom]\nenabled = false\n[[capture]]\nname = "cam"\nsource = "/dev/video0"\n',
        encoding="utf-8",
    )
    daemon = Daemon(load_config(path, env={}))
    with pytest.raises(ConfigError, match=r"medge\[capture\]"):
        daemon.start()
    assert daemon.captures == [] and daemon.scheduler is not None and not daemon.ready


def test_the_daemon_does_not_load_pyav_without_a_capture() -> None:
    code = (
        "import sys, edge.daemon, edge.ingest.capture, edge.ingest.capture_frames, edge.commands.capture, "
        "edge.tools.capture_client\n"
        "print('av' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
    assert capture_frames.source_kind("/dev/video3") == "device"
