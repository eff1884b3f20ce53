"""The outbox on disk: its folders and files, what they hold, and re-queueing.

Layout under ``<spool_dir>/outbox``:

``pending/<destination>/<SOPInstanceUID>.dcm``
    One copy per destination, written atomically (temp, fsync, rename,
    fsync dir) before the source instances are deleted from the spool.
    Removed only after that destination answered a success (or warning)
    status to the C-STORE.
``pending/<destination>/<SOPInstanceUID>.attempts.json``
    When the destination refused this object with a transient status: the
    wall-clock times of those attempts (so the limit survives a restart;
    :func:`charge_attempt`).
``dead-letter/<destination>/<SOPInstanceUID>.dcm`` + ``.reason.txt``
    Objects that failed permanently (the peer rejected them: ``0xA9xx``,
    ``0xCxxx``, ``0x01xx``; the peer accepts no presentation context for the
    SOP class) or were refused transiently ``max_attempts`` times within
    ``attempt_window_s``. Kept, counted, never retried automatically;
    ``medge outbox requeue --dead-letter`` puts them back in ``pending/``
    (:func:`requeue_dead_letters`).
``unsent/``
    Results when no destination is configured (logged once). When the
    outbox starts with at least one destination, everything here is
    re-queued for every destination (:func:`requeue_unsent`), so results
    written before a PACS was configured are sent once it is.
``tmp/``
    Files being written (emptied when the outbox starts).

Re-queueing (:func:`requeue_unsent`, :func:`requeue_dead_letters`, used at
start and by ``medge outbox requeue``) only links and renames files inside
the outbox, so it works while the daemon runs: a sender lists its
``pending/<destination>/`` folder on every turn of its loop (at least once
a second when idle, every few seconds while it backs off), so files that
appear there are picked up without a restart. Each moved object's
modification time is set to the time of the re-queue: the oldest-age metric
(and :func:`outbox_status`) counts from when an object was queued for its
destination.

Nothing here keeps state or logs: the folder is the index, and the sender
threads (:mod:`edge.egress.dicom.outbox`) and ``medge outbox``
(:mod:`edge.commands.outbox`) share these functions.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> obj = root / PENDING_DIR / "pacs" / object_name("1.2.3")
>>> str(obj.relative_to(root)), attempts_path(obj).name, reason_path(obj).name
('pending/pacs/1.2.3.dcm', '1.2.3.attempts.json', '1.2.3.reason.txt')
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edge.fileio import atomic_write, fsync_dir
from edge.ingest.dicom.spool import SPOOL_FILE_MODE, safe_name

__all__ = [
    "PENDING_DIR",
    "DEAD_LETTER_DIR",
    "UNSENT_DIR",
    "TMP_DIR",
    "OBJECT_SUFFIX",
    "ATTEMPTS_SUFFIX",
    "REASON_SUFFIX",
    "object_name",
    "attempts_path",
    "reason_path",
    "dated_objects",
    "result_bytes",
    "charge_attempt",
    "DestinationBacklog",
    "OutboxStatus",
    "outbox_status",
    "requeue_unsent",
    "requeue_dead_letters",
]

#: objects waiting, one folder per destination
PENDING_DIR = "pending"
#: objects given up on, one folder per destination
DEAD_LETTER_DIR = "dead-letter"
#: results written while no destination was configured
UNSENT_DIR = "unsent"
#: files being written
TMP_DIR = "tmp"
#: a result object (a DICOM Part 10 file)
OBJECT_SUFFIX = ".dcm"
#: beside a pending object: the times of its transient refusals (JSON list of wall-clock seconds)
ATTEMPTS_SUFFIX = ".attempts.json"
#: beside a dead letter: why it was given up on (one line)
REASON_SUFFIX = ".reason.txt"

_OBJECTS = f"*{OBJECT_SUFFIX}"


def object_name(sop_instance_uid: str) -> str:
    """The file name of the result object with ``sop_instance_uid``."""
    return f"{safe_name(sop_instance_uid)}{OBJECT_SUFFIX}"


def attempts_path(obj: Path) -> Path:
    """The attempts record beside the pending object ``obj``."""
    return obj.with_name(obj.stem + ATTEMPTS_SUFFIX)


def reason_path(obj: Path) -> Path:
    """The reason file beside the dead letter ``obj``."""
    return obj.with_name(obj.stem + REASON_SUFFIX)


def dated_objects(folder: Path) -> list[tuple[int, str, Path]]:
    """``(mtime_ns, name, path)`` of the objects in ``folder``, oldest first (none if it is missing)."""
    dated: list[tuple[int, str, Path]] = []
    for p in folder.glob(_OBJECTS) if folder.is_dir() else ():
        try:
            dated.append((p.stat().st_mtime_ns, p.name, p))
        except FileNotFoundError:
            continue  # sent (and removed) by a sender thread since the listing
    dated.sort(key=lambda t: (t[0], t[1]))
    return dated


def result_bytes(root: Path) -> int:
    """Bytes of the result objects in the outbox ``root`` (pending, dead-letter and unsent)."""
    total = 0
    for pattern in (f"{PENDING_DIR}/*/{_OBJECTS}", f"{DEAD_LETTER_DIR}/*/{_OBJECTS}", f"{UNSENT_DIR}/{_OBJECTS}"):
        for p in root.glob(pattern):
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # removed while we looked
                pass
    return total


def charge_attempt(obj: Path, window_s: float, tmp_dir: Path) -> int:
    """Record one transient refusal of the pending object ``obj`` now, durably.

    Returns
    -------
    int
        The refusals recorded within the last ``window_s`` seconds, this one
        included (older ones are dropped from the record).
    """
    ap = attempts_path(obj)
    now = time.time()
    try:
        times = [float(t) for t in json.loads(ap.read_text(encoding="utf-8"))]
    except (FileNotFoundError, ValueError):
        times = []
    times = [t for t in times if now - t < window_s] + [now]
    atomic_write(ap, [json.dumps(times).encode("utf-8")], tmp_dir=tmp_dir, mode=SPOOL_FILE_MODE)
    return len(times)


@dataclass(frozen=True)
class DestinationBacklog:
    """One destination's folders as :func:`outbox_status` found them.

    ``configured`` is False for a folder left from a destination that is no
    longer in the configuration (its objects are not sent).
    """

    destination: str
    configured: bool
    pending: int
    oldest_age_s: float
    dead_letters: int


@dataclass(frozen=True)
class OutboxStatus:
    """What the outbox folder holds: per destination, and ``unsent`` (results with nowhere to go)."""

    destinations: tuple[DestinationBacklog, ...]
    unsent: int


def outbox_status(root: Path | str, destinations: Sequence[str]) -> OutboxStatus:
    """Count what waits in the outbox folder ``root``, without touching it.

    Parameters
    ----------
    root : path-like
        The outbox folder (``<spool_dir>/outbox``).
    destinations : sequence of str
        The configured destination names; folders of other names found on
        disk are listed too, with ``configured=False``.

    Examples
    --------
    >>> import tempfile
    >>> st = outbox_status(tempfile.mkdtemp(), ["pacs"])
    >>> [(d.destination, d.pending, d.oldest_age_s, d.dead_letters) for d in st.destinations], st.unsent
    ([('pacs', 0, 0.0, 0)], 0)
    """
    root = Path(root)
    names = list(dict.fromkeys(destinations))
    for sub in (PENDING_DIR, DEAD_LETTER_DIR):
        if (root / sub).is_dir():
            names += sorted(p.name for p in (root / sub).iterdir() if p.is_dir() and p.name not in names)
    now = time.time()
    rows = []
    for name in names:
        dated = dated_objects(root / PENDING_DIR / name)
        age = max(0.0, now - dated[0][0] / 1e9) if dated else 0.0
        dead = len(list((root / DEAD_LETTER_DIR / name).glob(_OBJECTS)))
        rows.append(DestinationBacklog(name, name in destinations, len(dated), age, dead))
    unsent = len(list((root / UNSENT_DIR).glob(_OBJECTS)))
    return OutboxStatus(tuple(rows), unsent)


def _link_into(src: Path, targets: Sequence[Path], tmp_dir: Path) -> None:
    """Hard-link ``src`` into each of ``targets`` (a durable copy where links fail); folders not fsync'ed."""
    for t in targets:
        target = t / src.name
        try:
            os.link(src, target)
        except FileExistsError:
            pass  # already pending there (an earlier re-queue that was cut short)
        except OSError:  # a file system without hard links: a durable copy
            atomic_write(target, [src.read_bytes()], tmp_dir=tmp_dir, sync_dir=False, mode=SPOOL_FILE_MODE)


def requeue_unsent(root: Path | str, destinations: Sequence[str]) -> int:
    """Move every result in ``<root>/unsent/`` into ``pending/<name>/`` for each of ``destinations``.

    Crash-safe and durable: each object is first hard-linked (copied where
    the file system cannot link) into every destination but the last, those
    folders are fsync'ed, and only then is it renamed into the last one and
    the folders fsync'ed again. A crash half-way leaves it in ``unsent/``
    and in some ``pending/`` folders; the next call completes the move (an
    object already pending for a destination is left as it is), so nothing
    is lost, and at worst one object is sent twice with the same SOP
    Instance UID, which a PACS treats as a resend. The objects' modification
    times are set to now (see the module docstring). Safe while the daemon
    runs.

    Returns
    -------
    int
        How many objects were moved.

    Raises
    ------
    ValueError
        If ``destinations`` is empty.
    """
    if not destinations:
        raise ValueError("requeue_unsent needs at least one destination.")
    root = Path(root)
    targets = [root / PENDING_DIR / name for name in dict.fromkeys(destinations)]
    for t in targets:
        t.mkdir(parents=True, exist_ok=True)
    unsent_dir = root / UNSENT_DIR
    files = [p for _, _, p in dated_objects(unsent_dir)]
    if not files:
        return 0
    tmp_dir = root / TMP_DIR
    tmp_dir.mkdir(exist_ok=True)
    moved: list[Path] = []
    for src in files:
        try:
            os.utime(src)
        except FileNotFoundError:
            continue  # re-queued by someone else meanwhile
        _link_into(src, targets[:-1], tmp_dir)
        moved.append(src)
    for t in targets[:-1]:
        fsync_dir(t)
    done = 0
    for src in moved:
        try:
            os.replace(src, targets[-1] / src.name)
            done += 1
        except FileNotFoundError:
            continue
    fsync_dir(targets[-1])
    fsync_dir(unsent_dir)
    return done


def requeue_dead_letters(root: Path | str, destination: str) -> int:
    """Move ``destination``'s dead letters back to its pending folder, with a fresh attempt count.

    Each object is renamed into ``pending/<destination>/`` (any attempts
    record there is removed first, so it gets ``max_attempts`` again), the
    folders are fsync'ed, then its ``.reason.txt`` is removed. Safe while
    the daemon runs; its sender picks the objects up on its next turn.

    Returns
    -------
    int
        How many objects were moved.
    """
    root = Path(root)
    dead_dir = root / DEAD_LETTER_DIR / destination
    pend = root / PENDING_DIR / destination
    pend.mkdir(parents=True, exist_ok=True)
    moved: list[Path] = []
    for p in sorted(dead_dir.glob(_OBJECTS)) if dead_dir.is_dir() else ():
        attempts_path(pend / p.name).unlink(missing_ok=True)
        try:
            os.utime(p)
            os.replace(p, pend / p.name)
        except FileNotFoundError:
            continue
        moved.append(p)
    if moved:
        fsync_dir(pend)
        fsync_dir(dead_dir)
    # Reasons of the moved objects, and any left without their object by an earlier cut-short call.
    for reason in dead_dir.glob(f"*{REASON_SUFFIX}") if dead_dir.is_dir() else ():
        if not reason.with_name(reason.name[: -len(REASON_SUFFIX)] + OBJECT_SUFFIX).exists():
            reason.unlink(missing_ok=True)
    return len(moved)
