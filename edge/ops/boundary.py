"""Error boundaries of the daemon's loops: log once (rate-limited), count, keep serving.

Every loop that serves peers (the ZeroMQ I/O thread, scheduler workers and
their callbacks, the DICOM pipeline and finaliser, the outbox senders, the
HTTP handlers) catches what it did not expect at one place and calls
:meth:`ErrorBoundary.report`. The exception is counted in
``medge_internal_errors_total{component}`` and logged with its traceback
at most once per ``interval_s`` for each (component, exception type): a peer
that triggers the same failure thousands of times a second cannot flood the
journal, and the count still tells the operator how often it happened.

The log line names the component and the exception type, with the
traceback's frames (file, line, function, source line). The exception's
*message* is logged only for medge's own errors (:class:`~edge.errors.MedgeError`,
whose messages never carry patient data): a third-party message may quote
the peer's data (pydicom's ``Unable to convert 'SMITH-1970' to 'DA'``), so
it is withheld, also at debug level. Callers pass ``what`` as a bounded
description, never a value taken from a peer.

Examples
--------
>>> import logging
>>> from prometheus_client import CollectorRegistry
>>> b = ErrorBoundary("zmq_io", logging.getLogger("x"), CollectorRegistry())
>>> try:
...     raise ValueError("boom")
... except ValueError as exc:
...     b.report(exc)
>>> b.count
1
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any

from prometheus_client import CollectorRegistry

from edge.errors import MedgeError
from edge.ops.metrics import metrics_for

__all__ = ["ErrorBoundary", "LogThrottle", "internal_errors_counter", "safe_traceback"]


def internal_errors_counter(registry: CollectorRegistry | None) -> Any:
    """``medge_internal_errors_total{component}`` on ``registry`` (created once per registry)."""
    if registry is None:
        return None
    return metrics_for(registry).boundary.internal_errors


class LogThrottle:
    """At most one log record per key per ``interval_s``; counts what it held back.

    For conditions a peer can repeat at will (refused connections, an
    overloaded service, failed logins): each is logged, but cannot flood
    the journal.

    Examples
    --------
    >>> log = logging.getLogger("example.throttle")
    >>> log.addHandler(logging.NullHandler())
    >>> t = LogThrottle(log, interval_s=60.0)
    >>> t.warning("k", "Said once.")
    True
    >>> t.warning("k", "Said once.")
    False
    >>> t.due("k") is None
    True
    """

    def __init__(self, logger: logging.Logger | None = None, interval_s: float = 30.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """``None`` to stay quiet, else how many records were held back since the last one."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at WARNING unless ``key`` was logged within the interval; True if logged."""
        held = self.due(key)
        if held is None:
            return False
        if self._log is not None:
            self._log.warning(msg + (f" ({held} more like it since the last report)" if held else ""), *args,
                              stacklevel=2)
        return True


class ErrorBoundary:
    """Rate-limited logging and counting of unexpected exceptions for one component.

    Parameters
    ----------
    component : str
        A bounded label value (``zmq_io``, ``scheduler``, ``dicom_pipeline``, ...).
    logger : logging.Logger
    registry : CollectorRegistry, optional
        Where ``medge_internal_errors_total`` lives; ``None``: log only.
    interval_s : float
        At most one log record per exception type per this many seconds.
    """

    def __init__(
        self, component: str, logger: logging.Logger, registry: CollectorRegistry | None = None, interval_s: float = 60.0
    ) -> None:
        self.component = component
        self._log = logger
        self._throttle = LogThrottle(None, interval_s)
        self._lock = threading.Lock()
        self.count = 0
        counter = internal_errors_counter(registry)
        self._counter = counter.labels(component=component) if counter is not None else None
        if self._counter is not None:
            self._counter.inc(0)

    def report(self, exc: BaseException, what: str = "") -> None:
        """Count ``exc`` and log it (with traceback) unless its type was logged within the interval."""
        name = type(exc).__name__
        with self._lock:
            self.count += 1
        suppressed = self._throttle.due(name)
        log_it = suppressed is not None
        if self._counter is not None:
            self._counter.inc()
        if log_it:
            more = f" ({suppressed} more since the last report)" if suppressed else ""  # not None here
            self._log.error(
                "Unexpected %s in %s%s; it kept serving%s.\n%s",
                name,
                self.component,
                f" ({what})" if what else "",
                more,
                safe_traceback(exc),
            )


def safe_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` with third-party exception messages withheld.

    Frames (file, line, function, source line) are kept: they show where it
    failed. Messages are kept for :class:`~edge.errors.MedgeError` only;
    others become ``<module>.<type> (message withheld: it may quote data
    from the peer)``. Chained causes are rendered the same way.

    Examples
    --------
    >>> birth_date = "SMITH-1970"  # a value taken from a peer's data set
    >>> try:
    ...     raise ValueError(f"Unable to convert {birth_date!r} to 'DA' object")
    ... except ValueError as exc:
    ...     text = safe_traceback(exc)
    >>> "SMITH" in text, text.splitlines()[-1]
    (False, 'builtins.ValueError (message withheld: it may quote data from the peer)')
    """
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(parts) < 8:
        seen.add(id(cur))
        frames = "".join(traceback.format_tb(cur.__traceback__))
        kind = f"{type(cur).__module__}.{type(cur).__qualname__}"
        if isinstance(cur, MedgeError):
            last = f"{kind}: {cur}"
        else:
            last = f"{kind} (message withheld: it may quote data from the peer)"
        parts.append(f"Traceback (most recent call last):\n{frames}{last}")
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return "\n\nwhich was raised while handling or from:\n\n".join(parts)
