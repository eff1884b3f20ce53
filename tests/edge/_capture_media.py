"""Video files made in the test (PyAV encode) for the capture tests.

:func:`need_pyav` skips a test where PyAV is missing (a failure under
``CI=true``).

H.264 (``libx264``) where PyAV's FFmpeg has the encoder, else MJPEG; MPEG-TS
for H.264 (a damaged middle still demuxes), Matroska for MJPEG.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pytest

from edge.tools.synthetic import make_source
from tests.conftest import in_ci



def need_pyav() -> Any:
    """The ``av`` module; skips the calling test where PyAV is missing (fails under ``CI=true``).

    Called per test (an autouse fixture of the capture test modules), not at
    import: a run that deselects them (``-k``) reports no skip.
    """
    try:
        import av
    except ImportError:
        why = "PyAV (the capture extra: pip install 'medge[capture]') is not installed"
        if in_ci():
            pytest.fail(f"{why}; CI=true requires it (make venv installs it)", pytrace=False)
        pytest.skip(why)
    return av


#: The split test pattern: columns left of SPLIT_X are DARK, the rest BRIGHT.
DARK, BRIGHT, SPLIT_X = 40, 220, 80


def codec() -> tuple[str, str]:
    """``(encoder, file suffix)``: H.264 in MPEG-TS where available, else MJPEG in Matroska."""
    return ("libx264", ".ts") if "libx264" in need_pyav().codecs_available else ("mjpeg", ".mkv")


def encode(path: Path, frames: Iterable[np.ndarray], fps: int = 30, pts: Sequence[int] | None = None) -> Path:
    """Encode uint8 gray ``[H, W]`` or RGB ``[H, W, 3]`` frames to ``path`` (its suffix from :func:`codec`).

    ``pts``: each frame's timestamp in frame intervals (default 0, 1, 2, ...): a jump in them is a
    timestamp jump in the file.
    """
    av = need_pyav()
    name, _ = codec()
    with av.open(str(path), "w") as out:
        stream = None
        for i, img in enumerate(frames):
            if stream is None:
                stream = out.add_stream(name, rate=fps)
                stream.height, stream.width = img.shape[:2]
                stream.pix_fmt = "yuv420p" if name == "libx264" else "yuvj420p"
                if name == "libx264":
                    stream.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "18"}
            frame = av.VideoFrame.from_ndarray(img, format="gray" if img.ndim == 2 else "rgb24")
            frame.pts = i if pts is None else pts[i]
            for packet in stream.encode(frame):
                out.mux(packet)
        assert stream is not None, "no frames to encode"
        for packet in stream.encode():
            out.mux(packet)
    return path


def split_frames(n: int, height: int = 120, width: int = 160, seed: int = 0) -> list[np.ndarray]:
    """``n`` frames of the split pattern with a little noise (so every frame is coded)."""
    rng = np.random.default_rng(seed)
    base = np.full((height, width), DARK, np.uint8)
    base[:, SPLIT_X:] = BRIGHT
    return [np.clip(base.astype(np.int16) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
            for _ in range(n)]


def ultrasound_frames(n: int, height: int = 120, width: int = 160) -> list[np.ndarray]:
    """``n`` frames of the synthetic ultrasound probe (:func:`edge.tools.synthetic.make_source`)."""
    src = make_source("ultrasound", height, width, "uint8", seed=1, loop=8)
    return [src.frame(i) for i in range(n)]


def split_cine(folder: Path, n: int = 30, fps: int = 30) -> Path:
    """The split pattern as a video file in ``folder``."""
    return encode(folder / f"split{codec()[1]}", split_frames(n), fps)


def png_bomb(path: Path, side: int) -> Path:
    """A small PNG declaring a ``side`` x ``side`` 16-bit RGBA picture (``8 * side**2`` bytes decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    squeeze = zlib.compressobj(9)
    row = b"\0" * (1 + side * 8)
    idat = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
