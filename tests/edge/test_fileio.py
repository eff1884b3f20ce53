"""edge.fileio: the one atomic, durable file write (temp file, fsync, os.replace, folder fsync)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from edge.fileio import atomic_file, atomic_write, atomic_write_text, fsync_dir

ROOT = Path(__file__).resolve().parents[2]
SIZE = 256 * 1024  # big enough that a write in place is seen half-done by a reader


def _payload(version: int) -> bytes:
    """A whole version: SIZE bytes, all the same value, which names the version."""
    return bytes([version % 251 + 1]) * SIZE


def _whole(data: bytes) -> bool:
    return len(data) == SIZE and data == data[:1] * SIZE


def _leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_writes_bytes_chunks_and_text_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    assert atomic_write(target, b"one") == target and target.read_bytes() == b"one"
    atomic_write(target, [b"tw", bytearray(b"o-"), memoryview(b"chunks")])
    assert target.read_bytes() == b"two-chunks"
    atomic_write_text(target, "drei \u00fc\n")
    assert target.read_bytes() == "drei \u00fc\n".encode("utf-8")
    with atomic_file(target) as fh:
        fh.write(b"streamed")
    assert target.read_bytes() == b"streamed"
    assert _leftovers(tmp_path, "f.bin") == []
    with pytest.raises(TypeError, match="atomic_write_text"):
        atomic_write(target, "text")  # type: ignore[arg-type]
    assert target.read_bytes() == b"streamed"


def test_concurrent_threads_never_collide(tmp_path: Path) -> None:
    """Two threads replace the same file over and over; a reader only ever sees one whole version."""
    target = tmp_path / "shared.bin"
    atomic_write(target, _payload(0), durable=False)
    n_writes = 150
    errors: list[BaseException] = []
    stop = threading.Event()
    seen: set[bytes] = set()
    torn: list[int] = []

    def writer(first: int) -> None:
        try:
            for i in range(n_writes):
                atomic_write(target, _payload(first + 2 * i), durable=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if not _whole(data):
                torn.append(len(data))
            seen.add(data[:1])

    threads = [threading.Thread(target=writer, args=(k,)) for k in (1, 2)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    r.join(60)
    assert not errors, errors
    assert not torn, f"a reader saw {len(torn)} partial files"
    assert len(seen) > 1  # the reader did watch the writers at work
    assert _whole(target.read_bytes())
    assert _leftovers(tmp_path, "shared.bin") == []


_WRITER = """
import sys
from pathlib import Path
from edge.fileio import atomic_write
target, tmp_dir, first, n, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for i in range(n):
    atomic_write(target, bytes([(first + 2 * i) % 251 + 1]) * size, tmp_dir=tmp_dir, durable=i % 10 == 0)
"""


def test_concurrent_processes_with_one_tmp_dir_never_collide(tmp_path: Path) -> None:
    """Two processes share the target and the temp folder (as the spool's tmp/ is shared): no write fails or tears."""
    target, tmp_dir = tmp_path / "shared.bin", tmp_path / "tmp"
    tmp_dir.mkdir()
    atomic_write(target, _payload(0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(tmp_dir), str(k), "200", str(SIZE)],
                         env=env, stderr=subprocess.PIPE)
        for k in (1, 2)
    ]
    torn = reads = 0
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        data = target.read_bytes()
        reads += 1
        torn += not _whole(data)
    errs = [p.communicate(timeout=60)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert torn == 0 and reads > 0
    assert _whole(target.read_bytes())
    assert list(tmp_dir.iterdir()) == [] and _leftovers(tmp_path, "shared.bin") == ["tmp"]


def test_two_writers_hold_distinct_temp_files_at_once(tmp_path: Path) -> None:
    """A second write to the same target while the first is still writing gets a temp file of its own."""
    target, tmp_dir = tmp_path / "t.txt", tmp_path / "tmp"
    tmp_dir.mkdir()
    during: list[list[str]] = []

    def outer() -> Iterator[bytes]:
        yield b"outer-"
        atomic_write(target, [b"inner"], tmp_dir=tmp_dir)  # its temp file is gone once it returns
        during.append(sorted(p.name for p in tmp_dir.iterdir()))
        assert target.read_bytes() == b"inner"
        yield b"done"

    def inner_sees_two() -> Iterator[bytes]:
        during.append(sorted(p.name for p in tmp_dir.iterdir()))
        yield b"x"

    with atomic_file(target, tmp_dir=tmp_dir) as fh:
        fh.write(b"a")
        atomic_write(target, inner_sees_two(), tmp_dir=tmp_dir)
    assert len(during[0]) == 2 and during[0][0] != during[0][1]
    assert all(n.startswith(".t.txt.") and n.endswith(".tmp") for n in during[0])
    assert target.read_bytes() == b"a" and list(tmp_dir.iterdir()) == []

    atomic_write(target, outer(), tmp_dir=tmp_dir)
    assert len(during[1]) == 1  # only the outer write's temp file: the inner one was renamed
    assert target.read_bytes() == b"outer-done"
    assert _leftovers(tmp_path, "t.txt") == ["tmp"] and list(tmp_dir.iterdir()) == []


def test_failure_mid_write_keeps_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target, tmp_dir = tmp_path / "state.json", tmp_path / "tmp"
    tmp_dir.mkdir()
    atomic_write_text(target, "old\n")

    def broken() -> Iterator[bytes]:
        yield b"new, half"
        raise RuntimeError("the producer failed")

    for where in (None, tmp_dir):
        with pytest.raises(RuntimeError, match="producer failed"):
            atomic_write(target, broken(), tmp_dir=where)
        assert target.read_text() == "old\n"
        assert _leftovers(tmp_path, "state.json") == ["tmp"] and list(tmp_dir.iterdir()) == []

    with pytest.raises(KeyError):
        with atomic_file(target) as fh:
            fh.write(b"new")
            raise KeyError("stop")
    assert target.read_text() == "old\n" and _leftovers(tmp_path, "state.json") == ["tmp"]


def test_io_error_reaches_the_caller_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at fsync is the caller's OSError(ENOSPC) (the spool maps it to SpoolFullError); nothing changes."""
    target = tmp_path / "i.dcm"
    atomic_write(target, b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write(target, [b"new" * 1000])
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and _leftovers(tmp_path, "i.dcm") == []

    blocker = tmp_path / "dir"
    (blocker / "child").mkdir(parents=True)  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        atomic_write(blocker, b"x")
    assert (blocker / "child").is_dir() and _leftovers(tmp_path, "i.dcm") == ["dir"]

    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "f", b"x")


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["file", "dir"]),
        ({"durable": True, "sync_dir": False}, ["file"]),
        ({"durable": False}, []),
    ],
)
def test_durable_flag_decides_the_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         kwargs: dict[str, bool], expected: list[str]) -> None:
    calls = _record_fsyncs(monkeypatch)
    atomic_write(tmp_path / "f", b"data", **kwargs)
    assert calls == expected
    assert (tmp_path / "f").read_bytes() == b"data"


def test_fsync_dir_syncs_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_fsyncs(monkeypatch)
    fsync_dir(tmp_path)
    assert calls == ["dir"]
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "absent")


def test_mode_is_applied_less_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool_like = atomic_write(tmp_path / "a.dcm", b"x", mode=0o640)
        default = atomic_write(tmp_path / "b.json", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(spool_like.stat().st_mode) == 0o640
    assert stat.S_IMODE(default.stat().st_mode) == 0o644  # as open() would create it
