"""edge.tools.progress: one status line, in place on a terminal, plain throttled lines elsewhere."""

from __future__ import annotations

import io

from edge.tools.progress import Progress, bar


class _Clock:
    """A hand-moved clock: the tests never sleep."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bar_fills_its_width() -> None:
    assert bar(0.0, 4) == "    " and bar(0.5, 4) == "##  " and bar(1.0, 4) == "####"
    assert bar(2.0, 3, empty="-") == "###" and bar(-1.0, 3, empty="-") == "---" and bar(1 / 3, 6, "=", ".") == "==...."


def test_terminal_rewrites_one_line_and_blanks_leftovers() -> None:
    out, clock = io.StringIO(), _Clock()
    p = Progress(out, tty=True, interval_s=0.5, clock=clock)
    assert not p.show("too soon")  # within interval_s of the start
    clock.t += 0.5
    assert p.show("step 1/3 long")
    clock.t += 0.1
    assert not p.show("step 2/3")  # throttled
    assert p.show("3/3", final=True)  # a final update always shows
    p.close()
    p.close()  # a second close adds nothing
    assert out.getvalue() == "\rstep 1/3 long\r3/3          \n"


def test_elsewhere_plain_lines_every_interval_or_none() -> None:
    out, clock = io.StringIO(), _Clock()
    p = Progress(out, tty=False, interval_s=0.0, plain_interval_s=5.0, clock=clock)
    for _ in range(10):
        clock.t += 1.0
        p.show(f"t={clock.t:.0f}")
    p.show("done", final=True)
    p.close()
    assert out.getvalue() == "t=105\nt=110\ndone\n"  # no \r, nothing left open

    silent = io.StringIO()
    q = Progress(silent, tty=False, plain_interval_s=None)
    assert not q.show("x", final=True)
    q.close()
    assert silent.getvalue() == ""


def test_disabled_and_tty_detection() -> None:
    out = io.StringIO()
    p = Progress(out, enabled=False, tty=True)
    assert not p.show("x", final=True)
    assert out.getvalue() == "" and Progress(io.StringIO()).tty is False  # a StringIO is no terminal

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    t = Tty()
    with Progress(t) as q:
        assert q.tty and q.show("x")
    assert t.getvalue() == "\rx\n"
