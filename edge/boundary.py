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
traceback. Exceptions raised on purpose by medge never carry patient data in
their messages; callers pass ``what`` as a bounded description, never a
value taken from a peer.

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
from typing import Any

from prometheus_client import CollectorRegistry, Counter

__all__ = ["ErrorBoundary", "internal_errors_counter"]

_METRIC = "medge_internal_errors_total"


def internal_errors_counter(registry: CollectorRegistry | None) -> Any:
    """``medge_internal_errors_total{component}`` on ``registry`` (created once per registry)."""
    if registry is None:
        return None
    names = getattr(registry, "_names_to_collectors", {})
    found = names.get(_METRIC) or names.get(_METRIC.removesuffix("_total"))
    if found is not None:
        return found
    return Counter(
        _METRIC.removesuffix("_total"),
        "Unexpected exceptions caught by a loop's error boundary (the loop kept serving), by component.",
        ["component"],
        registry=registry,
    )


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
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.count = 0
        counter = internal_errors_counter(registry)
        self._counter = counter.labels(component=component) if counter is not None else None
        if self._counter is not None:
            self._counter.inc(0)

    def report(self, exc: BaseException, what: str = "") -> None:
        """Count ``exc`` and log it (with traceback) unless its type was logged within the interval."""
        name = type(exc).__name__
        now = time.monotonic()
        with self._lock:
            self.count += 1
            last = self._last.get(name)
            if last is not None and now - last < self._interval_s:
                self._suppressed[name] = self._suppressed.get(name, 0) + 1
                log_it = False
                suppressed = 0
            else:
                self._last[name] = now
                suppressed = self._suppressed.pop(name, 0)
                log_it = True
        if self._counter is not None:
            self._counter.inc()
        if log_it:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self._log.error(
                "Unexpected %s in %s%s; it kept serving%s.",
                name,
                self.component,
                f" ({what})" if what else "",
                more,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
