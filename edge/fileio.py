"""Atomic, durable file replacement: the one way medge writes a file that must never be seen half-written.

The protocol (as prometheus client_python's multiprocess files and every
careful spool do it):

1. the data goes to a temp file with a name no other writer can hold (the
   process id and a random token, created with ``O_EXCL``), beside the
   target or in ``tmp_dir``, which must be on the same file system;
2. the temp file is flushed and ``fsync``'ed (``durable=True``);
3. ``os.replace`` renames it over the target, atomically: a reader sees the
   old file or the new one, never a part of one;
4. the folder is ``fsync``'ed so the rename itself survives a power cut
   (``durable=True`` and ``sync_dir=True``; a caller renaming many files into
   one folder may pass ``sync_dir=False`` and call :func:`fsync_dir` once).

Any failure before the rename removes the temp file and leaves the target
as it was; the ``OSError`` reaches the caller unchanged, so each caller
keeps its own error translation (a full spool, a refused engine cache).

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> p = Path(tempfile.mkdtemp()) / "state.json"
>>> atomic_write_text(p, '{"n": 1}\\n').read_text()
'{"n": 1}\\n'
>>> _ = atomic_write(p, [b"ab", b"cd"], durable=False)
>>> p.read_bytes(), sorted(q.name for q in p.parent.iterdir())
(b'abcd', ['state.json'])
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Union

__all__ = ["atomic_file", "atomic_write", "atomic_write_text", "fsync_dir"]

Bytes = Union[bytes, bytearray, memoryview]

# Room left in a 255-byte file name for the temp name's prefix and suffix.
_NAME_KEEP = 160


def fsync_dir(path: Path | str) -> None:
    """Make the renames, links and removals in folder ``path`` durable (``fsync`` of the folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(folder: Path, name: str, mode: int) -> tuple[int, Path]:
    """Create and open a new temp file for ``name`` in ``folder``; its name is this writer's alone."""
    while True:
        tmp = folder / f".{name[:_NAME_KEEP]}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), tmp
        except FileExistsError:  # pragma: no cover - a 48-bit token collision
            continue


@contextlib.contextmanager
def atomic_file(
    path: Path | str,
    *,
    tmp_dir: Path | str | None = None,
    durable: bool = True,
    sync_dir: bool = True,
    mode: int = 0o666,
) -> Iterator[BinaryIO]:
    """A binary file to write; on leaving the block it replaces ``path`` atomically.

    For writers that stream (``np.savez``, ``torch.save``, ``shutil.copyfileobj``).
    If the block raises, the temp file is removed, ``path`` is left as it was and
    the exception propagates.

    Parameters
    ----------
    path : path-like
        The file to replace (its folder must exist).
    tmp_dir : path-like, optional
        Where the temp file lives (default: beside ``path``); on the same file
        system as ``path``. A folder that is emptied at start-up collects what a
        crash leaves.
    durable : bool
        ``fsync`` the file before the rename and the folder after it.
    sync_dir : bool
        With ``durable``, ``fsync`` the folder after the rename (pass False to
        batch: the caller calls :func:`fsync_dir` itself).
    mode : int
        Permission bits of the new file, less the umask (as :func:`open` does).
    """
    target = Path(path)
    fd, tmp = _create_temp(Path(tmp_dir) if tmp_dir is not None else target.parent, target.name, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable and sync_dir:
        fsync_dir(target.parent)


def atomic_write(
    path: Path | str,
    data: Bytes | Iterable[Bytes],
    *,
    tmp_dir: Path | str | None = None,
    durable: bool = True,
    sync_dir: bool = True,
    mode: int = 0o666,
) -> Path:
    """Replace ``path`` with ``data`` (bytes, or an iterable of byte chunks) atomically; returns ``path``.

    See :func:`atomic_file` for the parameters.

    Raises
    ------
    OSError
        Any I/O error (``ENOSPC``, ``EACCES``, ...); ``path`` is then unchanged
        and no temp file is left.
    TypeError
        If ``data`` is a ``str`` (use :func:`atomic_write_text`).
    """
    if isinstance(data, str):
        raise TypeError("atomic_write takes bytes; use atomic_write_text for text.")
    chunks: Iterable[Bytes] = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with atomic_file(path, tmp_dir=tmp_dir, durable=durable, sync_dir=sync_dir, mode=mode) as fh:
        for chunk in chunks:
            fh.write(chunk)
    return Path(path)


def atomic_write_text(
    path: Path | str,
    text: str,
    *,
    encoding: str = "utf-8",
    tmp_dir: Path | str | None = None,
    durable: bool = True,
    sync_dir: bool = True,
    mode: int = 0o666,
) -> Path:
    """Replace ``path`` with ``text`` (encoded with ``encoding``) atomically; returns ``path``."""
    return atomic_write(path, text.encode(encoding), tmp_dir=tmp_dir, durable=durable, sync_dir=sync_dir, mode=mode)
