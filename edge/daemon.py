"""The daemon: everything ``medge serve`` runs, and its lifecycle.

Start-up, in order: read and validate the configuration (a bad one stops
here with a message naming the key); start the HTTP server (``/healthz``
answers at once, ``/readyz`` says 503); load, verify and warm up every
model; start the scheduler; bind the ZeroMQ sockets; start the DICOM SCP
(``[dicom] enabled``); start the ``[[capture]]`` sources; then ``/readyz``
answers 200.

A capture source that cannot be opened (a V4L2 device absent at boot, a
stream that is down) does not stop the start-up or readiness: it is
retried with backoff on its own thread, ``medge_capture_up{capture}`` is 0
and :meth:`Daemon.capture_status` says why (one line per source). Only
PyAV missing while a ``[[capture]]`` is configured stops the start-up.

Under systemd (``Type=notify``) it sends ``READY=1`` once ready and
``STOPPING=1`` when it starts shutting down (:mod:`edge.ops.systemd`);
while a TensorRT engine is built or awaited during start-up, the engine
cache's heartbeat sends ``EXTEND_TIMEOUT_USEC`` so ``TimeoutStartSec=``
does not kill a first build (:func:`edge.ops.systemd.build_progress`). With ``WatchdogSec=`` in the
unit (``$WATCHDOG_USEC``), a :class:`Watchdog` thread sends ``WATCHDOG=1``
every half of that period, but only while every serving loop makes progress
(:meth:`Daemon.problems`); a dead or wedged loop stops the pings and systemd
restarts the daemon.

Readiness tells the truth: ``/readyz`` answers 503, with the component and
the reason in the body, and the ``medge_ready`` gauge is 0 whenever a model
worker, the ZeroMQ I/O loop, the DICOM SCP, the DICOM pipeline (workers,
finaliser) or an outbox sender has died, or has had work and made no
progress for ``stall_s`` (default :data:`STALL_S`). A loop that is idle
with nothing to do is healthy.

Fault injection (tests only, inert by default): the environment variable
``MEDGE_FAULT_INJECT``, read once at start by ``medge serve``
(:func:`edge.commands.serve.run`), arms one fault
(:func:`inject_fault`): ``worker-exit:MODEL`` makes the worker thread that
takes MODEL's next batch exit (as a crashing thread would), and
``worker-hang:MODEL`` makes that batch never return (a wedged backend). The
daemon logs a warning when one is armed. Never set it in production.

Shutdown on SIGTERM or SIGINT, within ``shutdown_timeout_s`` plus about a
second: stop the capture sources (their threads get 0.5 s in all to end),
stop accepting (new ZeroMQ requests are answered ``overloaded``), stop the
DICOM side, let the scheduler answer every accepted frame, send the last
replies, close the sockets, exit 0. A capture thread still blocked inside
FFmpeg by then is not waited for: ``medge serve`` ends with
:func:`end_process` (``os._exit`` after flushing the logs), as the
interpreter's own exit would crash under it.

Examples
--------
Run it in-process (tests, notebooks):

>>> from edge.config import load_config
>>> with Daemon(load_config()) as daemon:  # doctest: +SKIP
...     daemon.zmq.ingest_endpoint
'tcp://127.0.0.1:5555'
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq
from prometheus_client import CollectorRegistry

from edge.config import MedgeConfig
from edge.errors import ConfigError
from edge.inference.model import ModelRegistry
from edge.ingest.zmq import ZmqServer
from edge.ops.boundary import LogThrottle
from edge.ops.curve import CurveServer
from edge.ops.health import HealthServer
from edge.ops.metrics import MODEL_FAILURE_CODES, Metrics, metrics_for
from edge.ops.systemd import sd_notify  # re-exported: medge serve and the tests import it from here
from edge.scheduler import Scheduler

if TYPE_CHECKING:  # the capture modules are imported when a [[capture]] is configured
    from edge.ingest.capture import CaptureSource

__all__ = [
    "FAULT_INJECT_ENV",
    "STALL_S",
    "Daemon",
    "Watchdog",
    "end_process",
    "exit_after",
    "inject_fault",
    "sd_notify",
]

_log = logging.getLogger(__name__)
_PROBE_LOG = LogThrottle(_log)  # health-check failures: one traceback per component per 30 s

#: A serving loop that has work and has made no progress for this long is wedged (readiness, watchdog).
STALL_S = 60.0
#: Shutdown waits this long, in all, for the capture threads (stopped all at once) to end.
_CAPTURE_CLOSE_S = 0.5

#: Test-only fault injection, read once at start by ``medge serve`` (:func:`edge.commands.serve.run`) (see the module notes); unset in production.
FAULT_INJECT_ENV = "MEDGE_FAULT_INJECT"


class _Progress:
    """Whether a count of finished work moves while work waits: progress seen from outside a loop.

    ``stalled_s(done, waiting)`` is how long ``done`` has not changed while
    ``waiting`` stayed above 0 (0.0 when it moved or nothing waits). Correct
    however rarely it is called: ``waiting`` can only fall to 0 through
    ``done`` moving.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[str, float] = {}
        self._since: dict[str, float] = {}

    def stalled_s(self, key: str, done: float, waiting: float, now: float) -> float:
        with self._lock:
            if waiting <= 0 or self._done.get(key) != done:
                self._done[key], self._since[key] = done, now
                return 0.0
            return now - self._since[key]


class Daemon:
    """Everything ``medge serve`` runs, as one context manager.

    Parameters
    ----------
    config : MedgeConfig
        Validated configuration.
    registry : CollectorRegistry, optional
        Metrics registry (default: a fresh one; never the global default).

    Attributes
    ----------
    health : HealthServer or None
    models : ModelRegistry
    scheduler : Scheduler
    zmq : ZmqServer or None
    dicom : object or None
        What ``edge.ingest.dicom.scp.start_dicom`` returned.
    captures : list of CaptureSource
        The running ``[[capture]]`` sources (:mod:`edge.ingest.capture`).
    ready_s : float
        Seconds from :meth:`start` to ready.
    stall_s : float
        A loop with work and no progress for this long is wedged (default: ``[metrics] stall_s``, 60 s).
    """

    def __init__(
        self, config: MedgeConfig, registry: CollectorRegistry | None = None, *, stall_s: float | None = None
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.stall_s = float(stall_s if stall_s is not None else config.metrics.stall_s)
        self._progress = _Progress()
        metrics_for(self.registry).daemon.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        self.health: HealthServer | None = None
        self.models = ModelRegistry()
        self.scheduler: Scheduler | None = None
        self.zmq: ZmqServer | None = None
        self.dicom: Any = None
        self.captures: list[CaptureSource] = []
        self._zmq_ctx: zmq.Context | None = None
        self._curve: CurveServer | None = None
        self._ready = False
        self._stopped = False
        self._heap_frozen = False  # set by start: gc.freeze() of the start-up heap
        self.ready_s = 0.0

    @property
    def ready(self) -> bool:
        """Models loaded and warm, sockets bound, every serving loop alive and making progress, not shutting down."""
        return self._ready and not self.problems()

    def unhealthy(self) -> list[str]:
        """Names of the components that have died or are wedged (empty when all serve); see :meth:`problems`."""
        return [name for name, _ in self.problems()]

    def problems(self) -> list[tuple[str, str]]:
        """``(component, reason)`` for each serving loop that has died or is wedged (empty when all serve).

        Components: ``scheduler`` (the model workers), ``zmq`` (the I/O
        loop), ``dicom_scp`` (the accept loop), ``dicom_pipeline`` (its
        workers and finaliser), ``outbox`` (the sender threads) and
        ``capture`` (a capture thread that died; an absent or failing
        source is retried and is no readiness problem: see
        :meth:`capture_status`). Wedged
        means: work waits and nothing got done for :attr:`stall_s`. The
        scheduler is watched from outside: frames accepted but unanswered
        while the answered count stands still (all models), and a model
        whose queue holds frames while its batch count stands still (one
        model wedged while others serve). Reasons name components and
        models, never anything from a request.

        A component that lost its loop answers nothing (or only
        ``overloaded``); ``/readyz`` then says 503 so a load balancer or an
        operator sees it, instead of a daemon that looks ready and is not.
        """
        bad: list[tuple[str, str]] = []
        stall = self.stall_s
        sched = self.scheduler
        if sched is not None:
            why = self._probe(sched.healthy, "scheduler", "a model worker thread has died")
            if not why:
                why = self._scheduler_stall(sched)
            if why:
                bad.append(("scheduler", why))
        if self.zmq is not None:
            why = self._probe(lambda: self.zmq.healthy(stall), "zmq", "the ZeroMQ I/O loop has stopped or is stuck")
            if why:
                bad.append(("zmq", why))
        dicom = self.dicom
        if dicom is not None:
            parts = (
                ("dicom_scp", dicom, "the DICOM SCP's accept loop has stopped or is stuck"),
                ("dicom_pipeline", getattr(dicom, "pipeline", None),
                 "a DICOM pipeline thread (worker or finaliser) has died or is stuck"),
                ("outbox", getattr(dicom, "outbox", None), "an outbox sender thread has died or is stuck"),
            )
            for name, part, problem in parts:
                check = getattr(part, "healthy", None)
                if part is not None and callable(check):
                    why = self._probe(lambda c=check: c(stall), name, problem)
                    if why:
                        bad.append((name, why))
        for src in self.captures:
            why = self._probe(src.healthy, "capture", f"the thread of capture {src.config.name} has died")
            if why:
                bad.append(("capture", why))
        return bad

    def capture_status(self) -> list[str]:
        """``capture <name>: <state>; <counts>`` for each ``[[capture]]`` source (``/healthz`` details)."""
        return [f"capture {src.config.name}: {src.status()}" for src in self.captures]

    def blocked_captures(self) -> list[str]:
        """Names of the capture sources whose thread is still blocked in the source after :meth:`close`."""
        return [src.config.name for src in self.captures if src.blocked]

    @staticmethod
    def _probe(check: Any, name: str, problem: str) -> str:
        """``problem`` if ``check()`` is false or raises, else ''."""
        try:
            ok = bool(check())
        except Exception:  # noqa: BLE001 - a probe must answer, whatever the component does
            # Probes run on every /readyz, scrape and watchdog tick: one traceback per component per 30 s.
            if _PROBE_LOG.due(f"probe:{name}") is not None:
                _log.exception("Health check of %s failed.", name)
            ok = False
        return "" if ok else problem

    def _scheduler_stall(self, sched: Scheduler) -> str:
        """Why the scheduler counts as wedged ('' if it makes progress), from its counters and metrics."""
        now = time.monotonic()
        waiting = sched.pending()
        stalled = self._progress.stalled_s("answered", sched.answered, waiting, now)
        if stalled >= self.stall_s:
            return f"no frame answered for {stalled:.0f} s while {waiting} wait"
        # Only these two metrics are collected (never the whole registry: medge_ready itself calls this).
        depths = _by_model(self.metrics.queue_depth, "medge_queue_depth")
        batches = _by_model(self.metrics.batch_size, "medge_batch_size_count")
        for m in self.models:
            depth = depths.get(m.name, 0.0)
            stalled = self._progress.stalled_s(f"model:{m.name}", batches.get(m.name, 0.0), depth, now)
            if stalled >= self.stall_s:
                return f"model {m.name}: no batch finished for {stalled:.0f} s while {depth:.0f} frames wait"
        return ""

    def not_ready_reason(self) -> str:
        """Why ``/readyz`` says 503, one ``component: reason`` per line ('' when ready)."""
        bad = self.problems()
        if bad:
            return "\n".join(f"{name}: {why}" for name, why in bad)
        if self._stopped:
            return "shutting down"
        if not self._ready:
            return "starting: loading and warming up the models, binding the sockets"
        return ""

    def start(self) -> "Daemon":
        """Bring everything up; on failure, close what was started and re-raise."""
        t0 = time.perf_counter()
        cfg = self.config
        try:
            if cfg.metrics.enabled:
                try:
                    self.health = HealthServer.from_config(
                        cfg.metrics, self.registry, lambda: self.ready, reason=self.not_ready_reason,
                        details=lambda: "\n".join(self.capture_status()),
                    )
                except OSError as exc:
                    from edge.errors import ConfigError

                    raise ConfigError(
                        f"Config key metrics.port: cannot listen on {cfg.metrics.host}:{cfg.metrics.port}: {exc}."
                    ) from exc
            self.models = ModelRegistry.from_config(cfg, warmup=True)
            for m in self.models:
                self.metrics.model_info.labels(
                    model=m.name, version=m.version, backend=m.backend_label, precision=m.precision,
                    fallback=",".join(m.failed_steps),
                ).set(1)
                self.metrics.queue_depth.labels(model=m.name).set(0)
            self.scheduler = Scheduler(
                self.models,
                cfg.scheduler,
                self.metrics,
                default_model=cfg.default_model,
                model_configs={m.name: m for m in cfg.models},
            ).start()
            if cfg.zmq.enabled:
                self._zmq_ctx = zmq.Context(io_threads=1)
                if cfg.zmq.curve_enabled:
                    self._curve = CurveServer(
                        self._zmq_ctx, cfg.zmq.curve_server_key, cfg.zmq.curve_client_keys_dir
                    ).start()
                    self._curve.secure_context()  # the ROUTER and PUB sockets created next are CURVE servers
                self.zmq = ZmqServer(cfg.zmq, self.scheduler, self.metrics, context=self._zmq_ctx, catalog=self.models).start()
            if cfg.dicom.enabled:
                self.dicom = _start_dicom(cfg, self.scheduler, self.registry)
                self.metrics.declare_source("dicom", self.scheduler.models(), MODEL_FAILURE_CODES)
            self.captures = _start_captures(cfg, self.scheduler, self.metrics, self.zmq)
        except BaseException:
            self.close()
            raise
        self._heap_frozen = _freeze_startup_heap()
        self.ready_s = time.perf_counter() - t0
        self._ready = True
        _log.info(
            "medge ready in %.2f s: models %s; zmq %s; dicom %s; capture %s; metrics %s; spool %s.",
            self.ready_s,
            ", ".join(f"{m.name} ({m.backend_label}, {m.precision})" for m in self.models),
            self.zmq.ingest_endpoint if self.zmq else "off",
            f"{cfg.dicom.host}:{cfg.dicom.port}" if self.dicom is not None else "off",
            ", ".join(c.config.name for c in self.captures) or "off",
            self.health.url if self.health else "off",
            cfg.spool_dir,
        )
        return self

    def close(self) -> None:
        """Graceful shutdown: stop accepting, answer in-flight frames, close everything."""
        if self._stopped:
            return
        self._stopped = True
        self._ready = False
        try:
            self._shut_down()
        finally:
            if self._heap_frozen:  # whatever failed above: the start-up heap is this daemon's to release
                self._heap_frozen = False
                _release_startup_heap()

    def _shut_down(self) -> None:
        """The steps of :meth:`close`, in order, each within the shutdown budget."""
        t0 = time.monotonic()
        budget = self.config.shutdown_timeout_s
        for src in self.captures:
            src.stop()  # first (no frame of theirs is refused as overloaded), all at once; joined below
        if self.zmq is not None:
            self.zmq.stop_accepting()
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
        _close_captures(self.captures, _CAPTURE_CLOSE_S)
        if self.dicom is not None:
            try:
                self.dicom.close()
            except Exception:  # error boundary of shutdown: the rest must still close
                _log.exception("Closing the DICOM side failed.")
        # Budget: queued frames get what is left minus 2 s; a batch inside the backend 0.8 s
        # more; the last replies up to budget - 0.6 s; then a 0.5 s socket linger.
        if self.scheduler is not None:
            self.scheduler.close(timeout_s=max(0.3, budget - 2.0 - (time.monotonic() - t0)), grace_s=0.8)
        if self.zmq is not None:
            self.zmq.close(timeout_s=max(0.3, budget - 0.6 - (time.monotonic() - t0)))
        if self._curve is not None:
            self._curve.stop()
        if self._zmq_ctx is not None:
            # Sockets are closed with their linger by now; destroy never waits on a socket left open.
            self._zmq_ctx.destroy(linger=0)
        if self.health is not None:
            self.health.close()
        self.models.close()
        if self.scheduler is not None:
            _log.info(
                "medge stopped in %.2f s: %d frames accepted, %d answered.",
                time.monotonic() - t0,
                self.scheduler.accepted,
                self.scheduler.answered,
            )

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _by_model(metric: Any, sample: str) -> dict[str, float]:
    """The values of one metric's ``sample`` by its ``model`` label."""
    return {
        str(s.labels.get("model", "")): float(s.value)
        for family in metric.collect()
        for s in family.samples
        if s.name == sample
    }


class Watchdog:
    """Sends ``WATCHDOG=1`` to systemd every ``interval_s``, but only while ``check()`` is true.

    Parameters
    ----------
    check : callable
        True while every serving loop makes progress (``lambda: daemon.ready``).
    interval_s : float
        Half of the unit's ``WatchdogSec=`` (:meth:`interval_from_env`).
    notify : callable
        Sends one notification (default :func:`sd_notify`).

    Notes
    -----
    systemd arms the watchdog once the unit is started (after ``READY=1``);
    if no ``WATCHDOG=1`` arrives within ``WatchdogSec=`` it kills the daemon
    (SIGABRT) and ``Restart=on-failure`` starts it again. A daemon whose
    loop died or is wedged therefore stops pinging and is restarted, while
    ``/readyz`` already says why. The check runs on this thread, so a check
    that hangs also stops the pings.

    Examples
    --------
    >>> Watchdog.interval_from_env({"WATCHDOG_USEC": "30000000"})
    15.0
    >>> Watchdog.interval_from_env({}) is None
    True
    """

    def __init__(self, check: Any, interval_s: float, notify: Any = None) -> None:
        self._check = check
        self.interval_s = float(interval_s)
        self._notify = notify if notify is not None else sd_notify
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    @staticmethod
    def interval_from_env(env: Any = None) -> float | None:
        """Half of ``$WATCHDOG_USEC`` in seconds, or None when systemd asks for no watchdog (or not of us)."""
        env = os.environ if env is None else env
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec:
            return None
        if pid and pid.strip() != str(os.getpid()):
            return None  # meant for another process (sd_watchdog_enabled's rule)
        try:
            value = int(usec)
        except ValueError:
            _log.warning("Ignoring WATCHDOG_USEC=%r: not an integer.", usec)
            return None
        return value / 2e6 if value > 0 else None

    def start(self) -> "Watchdog":
        """Ping once now (if healthy), then every ``interval_s`` on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="medge-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop pinging (at shutdown; the daemon then sends ``STOPPING=1``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        healthy_before = True
        while True:
            try:
                healthy = bool(self._check())
            except Exception:  # noqa: BLE001 - the watchdog's one error boundary: no ping, try again
                _log.exception("The watchdog's health check failed.")
                healthy = False
            if healthy:
                if self._notify("WATCHDOG=1"):
                    self.pings += 1
                if not healthy_before:
                    _log.warning("Every serving loop makes progress again; the systemd watchdog is pinged again.")
            elif healthy_before:
                _log.error("A serving loop died or is wedged (see /readyz); the systemd watchdog is no longer pinged.")
            healthy_before = healthy
            if self._stop.wait(self.interval_s):
                return


class _InjectedFault(BaseException):
    """Raised by an injected ``worker-exit`` fault: a BaseException, so no error boundary swallows it."""


def inject_fault(daemon: Daemon, spec: str) -> threading.Event:
    """Arm one test-only fault in a started daemon (``MEDGE_FAULT_INJECT``; see the module notes).

    ``spec`` is ``worker-exit:MODEL`` or ``worker-hang:MODEL``. Returns an
    event: set it to let a hung batch return (tests). The fault fires once,
    on MODEL's next batch.

    Raises
    ------
    ConfigError
        If ``spec`` is not one of those, or MODEL is not served.
    """
    kind, _, name = spec.partition(":")
    if kind not in ("worker-exit", "worker-hang") or not name:
        raise ConfigError(
            f"Environment variable {FAULT_INJECT_ENV}={spec!r}: expected worker-exit:MODEL or worker-hang:MODEL."
        )
    model = next((m for m in daemon.models if m.name == name), None)
    if model is None:
        raise ConfigError(f"Environment variable {FAULT_INJECT_ENV}: model {name!r} is not served.")
    release = threading.Event()
    real_run = model.run

    def _faulty_run(images: Any) -> Any:
        model.run = real_run  # type: ignore[method-assign]  # once only
        if kind == "worker-exit":
            _log.error("Injected fault (%s): this model worker thread exits now.", FAULT_INJECT_ENV)
            raise _InjectedFault(spec)
        _log.error("Injected fault (%s): this batch hangs until shutdown.", FAULT_INJECT_ENV)
        release.wait()
        return real_run(images)

    model.run = _faulty_run  # type: ignore[method-assign]
    _log.warning("Test-only fault injection armed (%s=%s); never set it in production.", FAULT_INJECT_ENV, spec)
    return release



def _freeze_startup_heap() -> bool:
    """Collect once, then move every object alive after start-up out of the collector's reach.

    The models, sessions, imported modules and servers live as long as the
    daemon; without this, each full (oldest-generation) collection walks all
    of them: measured 26-29 ms with the three bundled models loaded on a
    2-vCPU AMD EPYC VM, a pause that lands on whichever frame is in flight
    (more than a 30 fps frame's whole budget beside inference). After
    ``gc.freeze()`` a full collection walks only what was allocated since
    (``gc.get_freeze_count()`` says how many objects were moved). Returns
    True; :func:`_release_startup_heap` undoes it when the last daemon of
    the process closes (``gc.unfreeze()`` is process-wide: it also releases
    what the host application froze itself).
    """
    global _FREEZE_HOLDERS
    with _FREEZE_LOCK:
        gc.collect()
        gc.freeze()
        _FREEZE_HOLDERS += 1
    _log.debug("Start-up heap frozen: %d objects left out of garbage collection.", gc.get_freeze_count())
    return True


def _release_startup_heap() -> None:
    """One daemon's share of :func:`_freeze_startup_heap`: unfreeze when no running daemon holds it."""
    global _FREEZE_HOLDERS
    with _FREEZE_LOCK:
        _FREEZE_HOLDERS = max(0, _FREEZE_HOLDERS - 1)
        if _FREEZE_HOLDERS == 0:
            gc.unfreeze()  # start-up objects become collectable again (an in-process restart, the tests)


_FREEZE_LOCK = threading.Lock()
_FREEZE_HOLDERS = 0  # daemons of this process that froze the heap and have not closed


def _start_dicom(cfg: MedgeConfig, service: Scheduler, registry: CollectorRegistry) -> Any:
    """Start the DICOM side through ``edge.ingest.dicom.scp.start_dicom`` where it is installed."""
    if importlib.util.find_spec("edge.ingest.dicom.scp") is None:
        _log.warning("[dicom] is enabled but edge.ingest.dicom.scp is not installed; DICOM is off.")
        return None
    from edge.ingest.dicom.scp import start_dicom

    return start_dicom(cfg, service, registry, cfg.spool_dir)


def _start_captures(
    cfg: MedgeConfig, service: Scheduler, metrics: Metrics, server: ZmqServer | None
) -> list[CaptureSource]:
    """Start every ``[[capture]]`` source (PyAV is imported only when there is one).

    The capture metric families are registered whether or not a source is
    configured, so the exposition's families do not depend on the config.

    Raises
    ------
    ConfigError
        If a ``[[capture]]`` is configured and PyAV (the ``capture`` extra) is not installed.
    """
    metrics_for(metrics.registry).capture  # noqa: B018 - registers the families
    if not cfg.capture:
        return []
    from edge.ingest.capture import CaptureSource
    from edge.ingest.capture_frames import require_av

    require_av()
    publish = server.publish if server is not None else None
    if publish is None:
        _log.warning("[zmq] is disabled: capture results are counted but not published.")
    return [CaptureSource(c, service, metrics, publish).start() for c in cfg.capture]


def _close_captures(captures: list[CaptureSource], timeout_s: float) -> None:
    """Join the (already stopped) capture threads under one shared deadline of ``timeout_s``.

    A thread still blocked at the deadline is left (:attr:`CaptureSource.blocked`):
    ten sources blocked in an open cost ``timeout_s`` in all, not ten times it.
    """
    deadline = time.monotonic() + timeout_s
    for src in captures:
        try:
            src.close(timeout_s=deadline - time.monotonic())
        except Exception:  # error boundary of shutdown: the rest must still close
            _log.exception("Closing capture %s failed.", src.config.name)


def end_process(daemon: Daemon, status: int) -> int:
    """After a finished :meth:`Daemon.close`: ``status``, or, with capture threads still blocked, exit now with it.

    A capture thread blocked inside FFmpeg (a stream that does not answer,
    a FIFO with no writer) cannot be stopped. Left to the interpreter's
    exit, it calls back into Python (PyAV's I/O interrupt callback) after
    the interpreter is finalised and the process dies of SIGSEGV instead of
    exiting with ``status``. So once shutdown is otherwise complete, the
    log handlers and stdout/stderr are flushed and the process ends with
    ``os._exit(status)``, never finalising the interpreter under them.
    """
    blocked = daemon.blocked_captures()
    if not blocked:
        return status
    _log.info("Capture %s still blocked in the source; exiting (%d) without waiting for it.",
              ", ".join(blocked), status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not stop the exit
            pass
    os._exit(status)


def exit_after(seconds: float) -> None:
    """Last resort of a bounded shutdown: if closing takes longer than ``seconds``, exit now.

    Every component closes within its share of ``shutdown_timeout_s``; this
    guards against one that cannot (a thread stuck in a library call). What
    was accepted durably (spooled DICOM, the outbox) is on disk and is picked
    up at the next start; ZeroMQ clients get no reply, as with a crash.
    """

    def _expire() -> None:
        _log.error("Shutdown did not finish within %.1f s; exiting without waiting further.", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, _expire)
    timer.daemon = True
    timer.start()
