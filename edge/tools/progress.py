"""A one-line progress display for long client-side work (``medge bench``, training).

On a terminal the line is rewritten in place (``\\r``) at most every
``interval_s``; anywhere else (a log file, a pipe, a CI console) each update
becomes a plain line, at most every ``plain_interval_s`` (or none at all
with ``plain_interval_s=None``), so logs stay readable. A final update
(``final=True``) is always shown. Callers format their own line; :func:`bar`
draws the bar part.

Examples
--------
>>> import io
>>> out = io.StringIO()
>>> p = Progress(out, plain_interval_s=0.0)
>>> for i in (1, 2):
...     _ = p.show(f"step [{bar(i / 2, 4)}] {i}/2")
>>> p.close()
>>> out.getvalue()
'step [##  ] 1/2\\nstep [####] 2/2\\n'
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress", "bar"]


def bar(fraction: float, width: int, fill: str = "#", empty: str = " ") -> str:
    """A bar of ``width`` characters, ``fraction`` (clipped to 0..1) of them ``fill``."""
    n = int(min(1.0, max(0.0, fraction)) * width)
    return fill * n + empty * (width - n)


class Progress:
    """One status line on ``stream`` (default ``sys.stderr``): in place on a terminal, plain lines elsewhere.

    Parameters
    ----------
    stream : text stream, optional
        Where the line goes; ``sys.stderr`` (as it is at construction) by default.
    enabled : bool
        False shows nothing.
    interval_s : float
        Least time between two lines on a terminal.
    plain_interval_s : float or None
        Least time between two lines elsewhere; None shows nothing there.
    tty : bool, optional
        Whether ``stream`` is a terminal (default: ``stream.isatty()``).
    clock : callable
        Seconds, monotonic (for tests).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        interval_s: float = 0.0,
        plain_interval_s: float | None = 5.0,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):  # no isatty, or a closed stream
                tty = False
        self.tty = tty
        self._interval_s = interval_s if tty else plain_interval_s
        self._clock = clock
        self._last = clock()
        self._width = 0  # longest line drawn in place, to blank what a shorter one would leave
        self._open = False  # a line drawn in place and not yet ended

    def show(self, line: str, *, final: bool = False) -> bool:
        """Show ``line`` unless one was shown less than the interval ago (``final`` always shows); True if shown."""
        if not self.enabled or self._interval_s is None:
            return False
        now = self._clock()
        if not final and now - self._last < self._interval_s:
            return False
        self._last = now
        if self.tty:
            self._width = max(self._width, len(line))
            self.stream.write("\r" + line.ljust(self._width))
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return True

    def close(self) -> None:
        """End the line drawn in place, if any (the next output starts on a line of its own)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
