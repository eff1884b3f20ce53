"""The TensorRT engine cache: one key function, one folder, a lock per key, atomic writes.

The daemon (:class:`~edge.inference.backends.tensorrt.TensorRTBackend`) and
``medge build`` (which builds through that same backend) use this module
alone to name, find, build and store plans, so a plan pre-built with
``medge build --config <the daemon's TOML>`` is the plan the daemon loads
and a start after it builds nothing.

**Key** (:func:`engine_cache_key`): the sha256 of every input a plan
depends on: the cache format (:data:`CACHE_FORMAT`, raised whenever the
build recipe changes), the ONNX artifact's sha256, the precision, the
largest batch (the optimisation profile is 1..max_batch), the input's
``(C, H, W)``, the TensorRT version, the GPU's name and compute capability,
and the CUDA device ordinal.

**Files** in the cache folder, per key: ``<model>-<precision>-sm<cc>-<digest16>.plan``
(:func:`engine_cache_path`), a ``.json`` sidecar with the key in clear,
and a ``.lock`` file (never holds data; see below).

**Protocol** (:meth:`PlanCache.load_or_build`), per key:

1. take an exclusive ``fcntl.flock`` on the ``.lock`` file; if another
   process holds it (it is building that plan), call ``progress("waiting")``
   and wait for it (at most :data:`LOCK_WAIT_S`);
2. if the plan is there, load it; one that fails to load (corrupt,
   truncated) is removed and built again, once;
3. otherwise build it (``progress("building")``), load it, and write it
   with :func:`edge.fileio.atomic_write` (a temp file with a name no other
   writer holds, fsync, rename, folder fsync);
4. after a successful write, remove the plans of the same model under other
   keys except the :data:`KEEP_OTHER` most recently used (a plan's mtime is
   touched when it is loaded), skipping any whose lock another process holds;
5. release the lock.

While waiting or building, a heartbeat calls ``progress`` every
:data:`~edge.ops.systemd.HEARTBEAT_S` (the default hook sends systemd
``EXTEND_TIMEOUT_USEC``, so a long first build under ``Type=notify`` is not
killed at start).

**A read-only or full disk** never stops the daemon: a folder that cannot
be created or locked, and a plan that cannot be written, are logged once per
folder (warning) and the plan built in memory is served; the next start
builds again. Two processes then may build the same plan at once.

Examples
--------
>>> key = EngineKey(gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), trt_version="10.3.0",
...                 precision="fp16", onnx_sha256="ab" * 32, max_batch=8, input_chw=(1, 256, 256))
>>> engine_cache_path("/var/lib/medge/engine-cache", "us-lesion-seg", key).name[:28]
'us-lesion-seg-fp16-sm90-256c'
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from edge.errors import BackendUnavailableError, EngineBuildError
from edge.fileio import atomic_write, atomic_write_text
from edge.ops.systemd import HEARTBEAT_S, build_progress

__all__ = [
    "CACHE_FORMAT",
    "KEEP_OTHER",
    "LOCK_WAIT_S",
    "MAX_PLAN_BYTES",
    "EngineKey",
    "PlanRejected",
    "CacheResult",
    "PlanCache",
    "engine_cache_key",
    "engine_cache_path",
]

_log = logging.getLogger(__name__)

#: Raised whenever what a plan is built from changes without a key input changing
#: (2: strongly typed networks, profile opt = max_batch).
CACHE_FORMAT = 2
#: Plans of the same model under other keys kept after a write (most recently used first):
#: room for a second precision or device sharing the folder, and for a rollback.
KEEP_OTHER = 2
#: Longest wait for another process's build of the same plan before giving up.
LOCK_WAIT_S = 3600.0
#: Largest plan file read back (a bigger one is treated as corrupt).
MAX_PLAN_BYTES = 4 << 30

_LOCK_POLL_S = 0.2
T = TypeVar("T")
Progress = Callable[[str], None]


class PlanRejected(Exception):
    """Raised by a ``load`` callback: these plan bytes cannot be deserialized here."""


# --------------------------------------------------------------------------- keys
def engine_cache_key(
    *,
    gpu_name: str,
    compute_capability: tuple[int, int],
    trt_version: str,
    precision: str,
    onnx_sha256: str,
    max_batch: int,
    input_chw: tuple[int, ...] = (),
    device_id: int = 0,
) -> str:
    """Hex sha256 identifying one TensorRT plan (pure; the daemon and ``medge build`` both use it).

    Cosmetic differences (spaces around the GPU name, the case of the
    sha256) do not change the key.
    """
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "gpu": gpu_name.strip(),
            "sm": f"{int(compute_capability[0])}.{int(compute_capability[1])}",
            "trt": str(trt_version).strip(),
            "precision": precision,
            "onnx": onnx_sha256.strip().lower(),
            "max_batch": int(max_batch),
            "input": [int(v) for v in input_chw],
            "device": int(device_id),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT plan depends on (see :func:`engine_cache_key`)."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str
    precision: str
    onnx_sha256: str
    max_batch: int
    input_chw: tuple[int, ...] = ()
    device_id: int = 0

    def digest(self) -> str:
        """Stable hex sha256 of the key."""
        return engine_cache_key(**dataclasses.asdict(self))


def engine_cache_path(cache_dir: Path | str, model_name: str, key: EngineKey) -> Path:
    """Where the plan for ``key`` lives: ``<cache_dir>/<model>-<precision>-sm<cc>-<digest16>.plan``."""
    cc = f"{key.compute_capability[0]}{key.compute_capability[1]}"
    return Path(cache_dir) / f"{model_name}-{key.precision}-sm{cc}-{key.digest()[:16]}.plan"


def _plan_pattern(model_name: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(model_name)}-(fp32|fp16|int8)-sm\d+-[0-9a-f]{{16}}\.plan")


# --------------------------------------------------------------------------- heartbeat
class _Heartbeat:
    """Calls ``progress(phase)`` every ``interval_s`` on a thread until closed; errors are logged, never raised."""

    def __init__(self, progress: Progress, interval_s: float) -> None:
        self._progress = progress
        self._interval_s = interval_s
        self.phase = ""
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="medge-engine-heartbeat", daemon=True)
        self._thread.start()

    def tell(self, phase: str) -> None:
        """Enter ``phase`` and report it now."""
        self.phase = phase
        self._call()

    def _call(self) -> None:
        if not self.phase:
            return
        try:
            self._progress(self.phase)
        except Exception:  # noqa: BLE001 - the heartbeat's error boundary: a hook must not stop a build
            if not self._failed:
                _log.exception("The engine build progress hook failed; continuing without it.")
            self._failed = True

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._call()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


# --------------------------------------------------------------------------- the cache
@dataclass
class CacheResult(Generic[T]):
    """What :meth:`PlanCache.load_or_build` returns.

    ``source``: ``cache`` (loaded), ``built`` (no plan was there) or
    ``rebuilt`` (the cached one failed to load). ``written``: the plan is on
    disk under ``path`` (False when the folder refused it: served from memory).
    """

    value: T
    path: Path
    source: str
    written: bool


class PlanCache:
    """The engine cache folder (see the module notes for the protocol).

    Parameters
    ----------
    cache_dir : path-like
        The folder (created if missing; ``[engine] cache_dir`` / ``<spool_dir>/engine-cache``).
    heartbeat_s : float
        Seconds between two progress calls while waiting or building.
    lock_wait_s : float
        Longest wait for another process's build.
    keep_other : int
        Plans of the same model under other keys kept after a write.
    """

    _warned: set[tuple[str, str]] = set()  # (folder, what): warn once per process, then debug
    _warned_lock = threading.Lock()

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        lock_wait_s: float = LOCK_WAIT_S,
        keep_other: int = KEEP_OTHER,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.heartbeat_s = float(heartbeat_s)
        self.lock_wait_s = float(lock_wait_s)
        self.keep_other = max(0, int(keep_other))

    def load_or_build(
        self,
        model_name: str,
        key: EngineKey,
        build: Callable[[], bytes],
        load: Callable[[bytes], T],
        progress: Progress | None = None,
    ) -> CacheResult[T]:
        """Load the plan for ``key``, building and storing it first if needed.

        Parameters
        ----------
        model_name : str
            The model (file name prefix; stale plans are looked for under it).
        key : EngineKey
            What the plan depends on.
        build : callable
            Returns new plan bytes (minutes on a GPU; raises on failure).
        load : callable
            Turns plan bytes into the usable object (deserializes them);
            raises :class:`PlanRejected` for bytes it cannot use.
        progress : callable, optional
            ``progress(phase)`` while waiting or building (default:
            :func:`edge.ops.systemd.build_progress`).

        Raises
        ------
        EngineBuildError
            A freshly built plan is rejected by ``load``.
        BackendUnavailableError
            Another process held the plan's lock for longer than ``lock_wait_s``.
        """
        path = engine_cache_path(self.cache_dir, model_name, key)
        beat = _Heartbeat(progress if progress is not None else build_progress, self.heartbeat_s)
        try:
            with self._locked(path, beat):
                return self._under_lock(model_name, key, path, build, load, beat)
        finally:
            beat.close()

    # ------------------------------------------------------------ steps
    def _under_lock(
        self, model_name: str, key: EngineKey, path: Path, build: Callable[[], bytes],
        load: Callable[[bytes], T], beat: _Heartbeat,
    ) -> CacheResult[T]:
        source = "built"
        data = self._read(path)
        if data is not None:
            try:
                value = load(data)
            except PlanRejected as exc:
                _log.warning("Cached TensorRT plan %s cannot be loaded (%s); removing it and building it again.",
                             path.name, exc)
                self._remove(path)
                source = "rebuilt"
            else:
                _touch(path)
                return CacheResult(value, path, "cache", True)
        beat.tell("building")
        t0 = time.monotonic()
        data = build()
        try:
            value = load(data)
        except PlanRejected as exc:
            raise EngineBuildError(f"TensorRT built a plan for {model_name} that it cannot load: {exc}") from exc
        _log.info("Built TensorRT plan %s in %.1f s.", path.name, time.monotonic() - t0)
        written = self._write(path, key, data)
        if written:
            self._clean_stale(model_name, path)
        return CacheResult(value, path, source, written)

    @contextlib.contextmanager
    def _locked(self, path: Path, beat: _Heartbeat) -> Iterator[bool]:
        """Hold the plan's lock (yields True), or go on unlocked where the folder refuses one (False)."""
        fd = self._open_lock(path)
        if fd is None:
            yield False
            return
        try:
            self._acquire(fd, path, beat)
            yield True
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def _open_lock(self, path: Path) -> int | None:
        lock = path.with_suffix(".lock")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            try:  # a read-only folder that already has the lock file can still be locked
                return os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._warn_once("lock", "TensorRT engine cache %s cannot be created or locked (%s); plans are "
                                "built in memory and not shared with other processes.", self.cache_dir, _why(exc))
                return None

    def _acquire(self, fd: int, path: Path, beat: _Heartbeat) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        _log.info("Another process is building TensorRT plan %s; waiting for it.", path.name)
        beat.tell("waiting")
        deadline = time.monotonic() + self.lock_wait_s
        waiter = threading.Event()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackendUnavailableError(
                        f"Another process has held the lock of TensorRT plan {path.name} for more than "
                        f"{self.lock_wait_s:.0f} s; is a build stuck? (lock file {path.with_suffix('.lock')})"
                    ) from None
                waiter.wait(_LOCK_POLL_S)  # flock has no timed wait: poll

    def _read(self, path: Path) -> bytes | None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            _log.warning("Cannot read cached TensorRT plan %s (%s); building it.", path.name, _why(exc))
            return None
        if size > MAX_PLAN_BYTES:
            _log.warning("Cached TensorRT plan %s is %d bytes (limit %d); rebuilding it.", path.name, size,
                         MAX_PLAN_BYTES)
            self._remove(path)
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            _log.warning("Cannot read cached TensorRT plan %s (%s); building it.", path.name, _why(exc))
            return None

    def _write(self, path: Path, key: EngineKey, data: bytes) -> bool:
        try:
            atomic_write(path, data)
            meta = {**dataclasses.asdict(key), "digest": key.digest(), "format": CACHE_FORMAT}
            atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
        except OSError as exc:
            self._warn_once("write", "Cannot store TensorRT plan %s in %s (%s); serving it from memory (the "
                            "next start builds it again).", path.name, self.cache_dir, _why(exc))
            return False
        return True

    def _remove(self, path: Path) -> None:
        for p in (path, path.with_suffix(".json")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._warn_once("remove", "Cannot remove %s (%s).", p, _why(exc))

    def _clean_stale(self, model_name: str, current: Path) -> None:
        """Remove this model's plans under other keys beyond the ``keep_other`` most recently used."""
        pattern = _plan_pattern(model_name)
        others: list[tuple[float, Path]] = []
        try:
            for p in self.cache_dir.iterdir():
                if p != current and pattern.fullmatch(p.name):
                    with contextlib.suppress(OSError):
                        others.append((p.stat().st_mtime, p))
        except OSError as exc:
            _log.debug("Cannot list %s for stale plans: %s", self.cache_dir, exc)
            return
        others.sort(reverse=True)
        for _, stale in others[self.keep_other :]:
            self._remove_if_unlocked(stale)

    def _remove_if_unlocked(self, plan: Path) -> None:
        lock = plan.with_suffix(".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # in use by another process: leave it
            self._remove(plan)
            with contextlib.suppress(OSError):
                lock.unlink()
            _log.info("Removed stale TensorRT plan %s.", plan.name)
        finally:
            os.close(fd)

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        mark = (str(self.cache_dir), what)
        with self._warned_lock:
            first = mark not in self._warned
            self._warned.add(mark)
        _log.log(logging.WARNING if first else logging.DEBUG, msg, *args)


def _touch(path: Path) -> None:
    """Mark a plan as recently used (stale-plan cleaning keeps the newest); a read-only folder is fine."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _why(exc: OSError) -> str:
    """An OSError as a short reason: ``errno name: text`` (no path: the message names it already)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror}" if name and exc.strerror else str(exc)
