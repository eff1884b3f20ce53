"""The durable spool of received DICOM instances and their per-instance results.

Everything the SCP answered success for lives here until its result sits in
the outbox. The folder itself is the crash-recovery index; there is no
separate database to get out of step with the files:

``<root>/instances/<name>.dcm``
    Received instances exactly as they arrived (file meta + the encoded data
    set). Present means "accepted, no result in the outbox yet".
``<root>/instances/<name>.attempts``
    How many times processing of ``<name>.dcm`` was started without
    finishing (a decimal number). Written durably *before* processing
    starts and removed once its result is saved, so a crash or an OOM kill
    in the middle still counts; an instance started ``[dicom] max_attempts``
    times is quarantined at the next start instead of crashing the daemon
    again (no poison pill).
``<root>/results/<name>.npz``
    The inference result of one instance (masks, boxes, or classes and
    decision per processed frame; with overlays on, also the first decoded
    frames the overlays are drawn on, so the finaliser never decodes a frame
    a second time, and a classification's class activation maps of those
    frames). Present means "inference done, series not yet finalised", so a
    restart does not run the model again. A result saved by an older
    version (no classification fields) still loads.
``<root>/failed/<name>.dcm`` + ``<name>.reason.txt``
    Instances that were accepted but could not be processed (undecodable
    pixels, a model error, over an input bound, too many unfinished
    attempts); kept for a person to look at, never deleted silently. The
    reason never holds patient data.
``<root>/tmp/``
    Partially written files; anything here at start-up is garbage from a
    crash and is removed.

A received instance is named by its SOP Instance UID. The spool also knows,
in memory, each pending instance's *identity* (study, series, SOP class,
modality, body part and a hash of the patient:
:attr:`edge.ingest.dicom.scan.InstanceInfo.identity`; recovery reads it
back from the files): :meth:`Spool.store_instance` replaces a pending
instance only with the same object sent again, and refuses another object
that carries the same SOP Instance UID (:class:`SpoolConflictError`), so
one never overwrites the other.

Every write is atomic and durable (:mod:`edge.fileio`): temp file in the same
file system, ``fsync``, ``os.replace``, ``fsync`` of the folder.

Examples
--------
>>> import tempfile
>>> spool = Spool(tempfile.mkdtemp())
>>> p = spool.store_instance("1.2.3", [b"DICM", b"..."])
>>> [q.name for q in spool.pending_instances()]
['1.2.3.dcm']
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, cast

import numpy as np

from edge.errors import MedgeError
from edge.fileio import atomic_write, fsync_dir

__all__ = ["SpoolError", "SpoolFullError", "SpoolConflictError", "Spool", "InstanceResult", "SPOOL_FILE_MODE", "safe_name"]

_log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9.]{1,64}$")
SPOOL_FILE_MODE = 0o640  # rw-r----- less the umask, for every file in the spool and its outbox (patient data)
_NAME_LOCKS = 64  # stripes of the per-name locks


class SpoolError(MedgeError):
    """The spool cannot take or give back a file (permissions, I/O error)."""


class SpoolFullError(SpoolError):
    """The spool has no room for another instance (quota or free disk space)."""


class SpoolConflictError(MedgeError):
    """Another object with the same SOP Instance UID (another study, series, SOP class or patient) is pending.

    Not a disk problem: nothing was written, and retrying will not help
    until the pending one is done.
    """


def safe_name(uid: str) -> str:
    """A file name for a UID: the UID itself when it is one, else a hash of it."""
    uid = uid.strip().rstrip("\x00")
    if _UID_RE.match(uid) and not uid.startswith("."):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


@dataclass
class InstanceResult:
    """Inference result of one instance: one entry per processed frame.

    ``frames`` are 1-based frame numbers; ``masks`` is ``[n, H, W]`` uint8 for
    segmentation models (else ``None``); ``boxes`` holds, per processed frame,
    a list of box dicts (``label score x0 y0 x1 y1``). ``display`` is
    ``[k, H, W]`` or ``[k, H, W, 3]``: the first ``k`` processed frames as
    the worker decoded them (:func:`edge.ingest.dicom.pixels.frame_to_array`), kept for
    the overlay images so that no frame is decoded twice (``None``: no
    overlays). It is saved losslessly and read back only by
    :meth:`Spool.load_display`, one instance at a time.

    Classification models: ``classes`` holds, per processed frame, the
    labels with their calibrated probabilities, best first (``label score``
    dicts), ``decisions`` per processed frame whether the top label reached
    ``threshold`` (the decision threshold in use, when known); ``None`` for
    the other tasks. ``heatmaps`` ``[k, H, W]`` uint8: the class activation
    maps of the first ``k`` processed frames, kept only for the overlays and
    read back only by :meth:`Spool.load_heatmaps`.
    """

    model: str
    model_version: str
    task: str
    frames: list[int]
    masks: np.ndarray | None = None
    boxes: list[list[dict]] = field(default_factory=list)
    display: np.ndarray | None = None
    classes: list[list[dict]] | None = None
    decisions: list[bool] | None = None
    threshold: float | None = None
    heatmaps: np.ndarray | None = None


#: Integer types a float32 display frame is stored as when it holds only their values (exact both ways).
_NARROW_TYPES = (np.uint8, np.int16, np.uint16)


def _narrow(a: np.ndarray) -> np.ndarray:
    """``a`` in the smallest integer type that holds it exactly (float32 frames of integer pixels), else ``a``."""
    if a.dtype != np.float32 or a.size == 0 or not np.array_equal(a, np.rint(a)):
        return a
    lo, hi = float(a.min()), float(a.max())
    for t in _NARROW_TYPES:
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return a.astype(t)
    return a


class Spool:
    """The spool folder; thread-safe.

    Parameters
    ----------
    root : path-like
        The spool folder (created if missing).
    max_bytes : int, optional
        Quota for ``instances/`` plus whatever ``extra_bytes`` reports; a
        store that would exceed it raises :class:`SpoolFullError`. ``None``:
        no quota.
    min_free_bytes : int
        Free space the file system must keep after a store (default 64 MiB;
        0: no reserve).
    extra_bytes : callable, optional
        ``extra_bytes(recount) -> int``: bytes held elsewhere that count
        against ``max_bytes`` (the outbox). Called with ``False`` on every
        store (must be cheap) and with ``True`` to count them on disk again
        before a store is refused (at most once per second).
    """

    #: Least seconds between two re-counts of ``extra_bytes`` on the refusal path.
    RECOUNT_INTERVAL_S = 1.0

    def __init__(
        self,
        root: Path | str,
        max_bytes: int | None = None,
        min_free_bytes: int = 64 << 20,
        extra_bytes: Callable[[bool], int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.instances_dir = self.root / "instances"
        self.results_dir = self.root / "results"
        self.failed_dir = self.root / "failed"
        self.tmp_dir = self.root / "tmp"
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.extra_bytes = extra_bytes
        self._last_recount = float("-inf")
        self._lock = threading.Lock()
        # Identity (InstanceInfo.identity) of each pending instance by file name, and locks (by name)
        # that make "check for a conflicting object, then write" and "remove" one step each.
        self._identities: dict[str, str] = {}
        self._name_locks = tuple(threading.Lock() for _ in range(_NAME_LOCKS))
        try:
            for d in (self.instances_dir, self.results_dir, self.failed_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            for stale in self.tmp_dir.iterdir():
                stale.unlink()
        except OSError as exc:
            raise SpoolError(f"Spool folder {self.root} is not usable: {exc}.") from exc
        self._used_bytes = sum(p.stat().st_size for p in self.instances_dir.glob("*.dcm"))

    # ------------------------------------------------------------ instances
    @property
    def used_bytes(self) -> int:
        """Bytes held in ``instances/``."""
        return self._used_bytes

    def _check_room(self, size: int) -> None:
        if self.max_bytes is not None:
            extra = self.extra_bytes(False) if self.extra_bytes is not None else 0
            if self._used_bytes + extra + size > self.max_bytes and self.extra_bytes is not None:
                now = time.monotonic()
                if now - self._last_recount >= self.RECOUNT_INTERVAL_S:
                    # Before refusing, count again: a person may have cleared dead letters.
                    self._last_recount = now
                    extra = self.extra_bytes(True)
            if self._used_bytes + extra + size > self.max_bytes:
                raise SpoolFullError(
                    f"Spool quota of {self.max_bytes} bytes would be exceeded ({self._used_bytes} in received "
                    f"instances, {extra} in the outbox, {size} more)."
                )
        if self.min_free_bytes > 0:
            st = os.statvfs(self.instances_dir)
            free = st.f_bavail * st.f_frsize
            if free - size < self.min_free_bytes:
                raise SpoolFullError(
                    f"Spool file system at {self.root} has {free} bytes free, "
                    f"below the reserve of {self.min_free_bytes} after {size} more."
                )

    def _name_lock(self, name: str) -> threading.Lock:
        return self._name_locks[hash(name) % _NAME_LOCKS]

    def store_instance(self, sop_instance_uid: str, chunks: Sequence[bytes], identity: str = "") -> Path:
        """Write one received instance durably; returns its path.

        ``identity`` (:attr:`edge.ingest.dicom.scan.InstanceInfo.identity`)
        tells a resend of the same object (same identity: the file is
        replaced, harmless) from a different object with the same SOP
        Instance UID (refused while the first is pending). Empty: no check.

        Raises
        ------
        SpoolConflictError
            A different object with this SOP Instance UID is pending; nothing was written.
        SpoolFullError
            Quota or disk reserve exceeded (also for ``ENOSPC``/``EDQUOT``).
        SpoolError
            Any other I/O error.
        """
        path = self.instances_dir / f"{safe_name(sop_instance_uid)}.dcm"
        with self._name_lock(path.name):
            held = self._identities.get(path.name)
            if identity and held and held != identity and path.exists():
                raise SpoolConflictError(
                    "An instance with the same SOP Instance UID but another study, series, SOP class, "
                    "modality or patient is pending; this one is refused."
                )
            self._write_instance(path, chunks)
            if identity:
                self._identities[path.name] = identity
        return path

    def _write_instance(self, path: Path, chunks: Sequence[bytes]) -> None:
        """Write ``path`` atomically within the quota (see :meth:`store_instance`)."""
        size = sum(len(c) for c in chunks)
        with self._lock:
            self._check_room(size)
            self._used_bytes += size
        try:
            old = path.stat().st_size if path.exists() else 0
            atomic_write(path, chunks, tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)
        except OSError as exc:
            with self._lock:
                self._used_bytes -= size
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise SpoolFullError(f"The disk of spool {self.root} is full: {exc.strerror}.") from exc
            raise SpoolError(f"Cannot write to spool {self.root}: {exc.strerror}.") from exc
        if old:
            with self._lock:
                self._used_bytes -= old

    def remember(self, path: Path, identity: str) -> None:
        """Record the identity of an instance found in the spool (recovery), for :meth:`store_instance`."""
        with self._name_lock(path.name):
            if path.exists():
                self._identities[path.name] = identity

    def pending_instances(self) -> list[Path]:
        """Instances with no result in the outbox yet, oldest first."""
        paths = list(self.instances_dir.glob("*.dcm"))
        paths.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return paths

    def remove_instances(self, paths: Iterable[Path]) -> None:
        """Delete instances (and their per-instance results) whose result is in the outbox."""
        for p in paths:
            with self._name_lock(p.name):
                try:
                    size = p.stat().st_size
                    p.unlink()
                except FileNotFoundError:
                    size = 0
                self._identities.pop(p.name, None)
            with self._lock:
                self._used_bytes -= size
            for q in (self.result_path(p), self.attempts_path(p)):
                try:
                    q.unlink()
                except FileNotFoundError:
                    pass
        fsync_dir(self.instances_dir)

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move an instance that cannot be processed to ``failed/`` with the reason beside it."""
        dst = self.failed_dir / path.name
        atomic_write(self.failed_dir / f"{path.stem}.reason.txt", [reason.encode("utf-8") + b"\n"],
                     mode=SPOOL_FILE_MODE)
        with self._name_lock(path.name):
            try:
                size = path.stat().st_size
                shutil.move(str(path), dst)
                fsync_dir(self.failed_dir)
                fsync_dir(self.instances_dir)
            except FileNotFoundError:
                size = 0
            self._identities.pop(path.name, None)
        with self._lock:
            self._used_bytes -= size
        for q in (self.result_path(path), self.attempts_path(path)):
            try:
                q.unlink()
            except FileNotFoundError:
                pass
        return dst

    # ------------------------------------------------------------ processing attempts
    def attempts_path(self, instance_path: Path) -> Path:
        """Where the unfinished-attempt count of ``instance_path`` is kept."""
        return self.instances_dir / f"{instance_path.stem}.attempts"

    def attempts(self, instance_path: Path) -> int:
        """How many times processing of ``instance_path`` started without finishing (0: none)."""
        try:
            text = self.attempts_path(instance_path).read_text("ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise SpoolError(f"Cannot read the attempt count of {instance_path.name}: {exc}.") from exc
        try:
            return max(0, int(text))
        except ValueError:
            # Written atomically, so this is damage from outside; err on the side of quarantine.
            _log.warning("Attempt count of %s is unreadable; treating it as very high.", instance_path.name)
            return 1 << 30

    def begin_attempt(self, instance_path: Path) -> int:
        """Count one more processing attempt, durably (fsync), before it starts; returns the new count."""
        n = self.attempts(instance_path) + 1
        atomic_write(self.attempts_path(instance_path), [str(n).encode("ascii") + b"\n"],
                     tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)
        return n

    def undo_attempt(self, instance_path: Path) -> None:
        """Take back an attempt that stopped for a transient reason (shutdown, overload): it must not count."""
        n = self.attempts(instance_path) - 1
        if n <= 0:
            self.clear_attempts(instance_path)
        else:
            atomic_write(self.attempts_path(instance_path), [str(n).encode("ascii") + b"\n"],
                         tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)

    def clear_attempts(self, instance_path: Path) -> None:
        """Processing finished (its result is saved): forget the attempts."""
        try:
            self.attempts_path(instance_path).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.instances_dir)

    # ------------------------------------------------------------ per-instance results
    def result_path(self, instance_path: Path) -> Path:
        """Where the result of ``instance_path`` is (or would be) kept."""
        return self.results_dir / f"{instance_path.stem}.npz"

    def save_result(self, instance_path: Path, result: InstanceResult) -> Path:
        """Persist one instance's inference result atomically."""
        import io

        meta: dict[str, Any] = {
            "model": result.model,
            "model_version": result.model_version,
            "task": result.task,
            "frames": [int(f) for f in result.frames],
            "boxes": result.boxes,
        }
        if result.classes is not None:  # only classification results carry these (older files lack them)
            meta["classes"] = result.classes
            meta["decisions"] = [bool(d) for d in result.decisions or []]
            meta["threshold"] = None if result.threshold is None else float(result.threshold)
        display = None
        if result.display is not None:
            meta["display_dtype"] = np.dtype(result.display.dtype).str  # restored exactly on load
            display = np.ascontiguousarray(_narrow(np.asarray(result.display)))
        buf = io.BytesIO()
        arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        if result.masks is not None:
            arrays["masks"] = np.ascontiguousarray(result.masks, dtype=np.uint8)
        if display is not None:
            arrays["display"] = display
        if result.heatmaps is not None:
            arrays["heatmaps"] = np.ascontiguousarray(result.heatmaps, dtype=np.uint8)
        cast(Any, np.savez_compressed)(buf, **arrays)
        out = self.result_path(instance_path)
        atomic_write(out, [buf.getvalue()], tmp_dir=self.tmp_dir, mode=SPOOL_FILE_MODE)
        return out

    def load_result(self, instance_path: Path) -> InstanceResult | None:
        """The saved result of ``instance_path``, or ``None`` when there is none (or it is unreadable).

        Its ``display`` frames and ``heatmaps`` are not read (see
        :meth:`load_display`, :meth:`load_heatmaps`). A result saved before
        classification existed loads with ``classes`` and ``decisions``
        ``None``.
        """
        p = self.result_path(instance_path)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                masks = z["masks"] if "masks" in z.files else None
        except (OSError, ValueError, KeyError) as exc:
            _log.warning("Ignoring unreadable result file %s (%s); the instance will be processed again.", p.name, exc)
            return None
        return InstanceResult(
            model=meta["model"],
            model_version=meta["model_version"],
            task=meta["task"],
            frames=list(meta["frames"]),
            masks=masks,
            boxes=meta["boxes"],
            classes=meta.get("classes"),
            decisions=meta.get("decisions"),
            threshold=meta.get("threshold"),
        )

    def load_display(self, instance_path: Path) -> np.ndarray | None:
        """The decoded frames saved with the result of ``instance_path`` for its overlays, or ``None``.

        ``None`` also when the result predates them or cannot be read: the
        caller decodes the frames instead.
        """
        p = self.result_path(instance_path)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if "display" not in z.files:
                    return None
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                display = z["display"]
            return display.astype(np.dtype(meta.get("display_dtype", display.dtype.str)), copy=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning(
                "Ignoring unreadable overlay frames in %s (%s); decoding them again.", p.name, type(exc).__name__
            )
            return None

    def load_heatmaps(self, instance_path: Path) -> np.ndarray | None:
        """The class activation maps saved with the result of ``instance_path`` (uint8 ``[k, H, W]``), or ``None``.

        ``None`` also when none were saved (overlays off, not a
        classification) or the file cannot be read: those frames get no
        overlay.
        """
        p = self.result_path(instance_path)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return z["heatmaps"] if "heatmaps" in z.files else None
        except (OSError, ValueError, KeyError) as exc:
            _log.warning("Ignoring unreadable class activation maps in %s (%s).", p.name, type(exc).__name__)
            return None
