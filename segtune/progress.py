"""Progress on long work: a rich bar on a terminal, periodic plain lines everywhere else.

Every step that can take more than a few seconds (preparing and checking data, building the
embedding cache, scoring a checkpoint, AMG, prompt search, reading runs for a report) counts
its work through :func:`progress` or :func:`track`::

    with progress("encoding images", total=len(images), unit="images") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))

On a terminal (stderr is a TTY) that draws a bar with counts, elapsed time and an ETA. When
output goes to a log file, CI or a Slurm job, a bar would be a stream of control characters,
so instead a plain line is written every ``SEGTUNE_PROGRESS_EVERY`` seconds (default 15) and
once at the end::

    encoding images: 120/1000 images (12%), 0:00:31 elapsed, about 0:03:48 left

Bars opened while another is on screen join the same display, so nested steps (a prepare
inside a sweep's setup) do not fight over the terminal.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")
Line = Callable[[str], None]

#: Seconds between plain progress lines when output is not a terminal.
EVERY_ENV = "SEGTUNE_PROGRESS_EVERY"
_DEFAULT_EVERY = 15.0

_display = None  # the rich Progress on screen, shared by nested bars


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get(EVERY_ENV, _DEFAULT_EVERY)))
    except ValueError:
        return _DEFAULT_EVERY


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class Bar:
    """Counts done work; see :func:`progress`. ``advance`` is cheap enough to call per item."""

    def __init__(self, label: str, total: int | None, unit: str, line: Line | None,
                 terminal: bool, every: float) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self._line = line or (lambda text: print(text, file=sys.stderr, flush=True))
        self._every = every
        self._start = self._last = time.monotonic()
        self._task = None
        if terminal:
            self._task = _display.add_task(label, total=total)  # type: ignore[union-attr]

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units of work as done."""
        self.done += n
        if self._task is not None:
            _display.advance(self._task, n)  # type: ignore[union-attr]
            return
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._line(self.status())

    def status(self) -> str:
        """One plain line: label, count, share, elapsed and (with a total) time left."""
        elapsed = time.monotonic() - self._start
        if self.total:
            share = self.done / self.total
            left = elapsed * (1 - share) / share if share > 0 else None
            eta = f", about {_clock(left)} left" if left is not None else ""
            return (f"{self.label}: {self.done}/{self.total} {self.unit} ({share:.0%}), "
                    f"{_clock(elapsed)} elapsed{eta}")
        return f"{self.label}: {self.done} {self.unit}, {_clock(elapsed)} elapsed"

    def _finish(self, ok: bool) -> None:
        if self._task is not None:  # the finished bar stays on screen, as pip's do
            _display.update(self._task, description=self.label + ("" if ok else " (stopped)"))  # type: ignore[union-attr]
            return
        elapsed = _clock(time.monotonic() - self._start)
        if ok:
            self._line(f"{self.label}: done, {self.done} {self.unit} in {elapsed}")
        else:
            self._line(f"{self.label}: stopped after {self.done} {self.unit} ({elapsed})")


@contextmanager
def progress(label: str, total: int | None = None, *, unit: str = "items",
             line: Line | None = None, terminal: bool | None = None,
             console: object | None = None) -> Iterator[Bar]:
    """A progress bar for one step; see the module docstring.

    ``line`` receives the plain lines (default: stderr). ``terminal`` forces the choice between
    a bar and plain lines (default: whether stderr is a TTY); ``console`` is the rich Console a
    bar draws on (tests pass one that writes to a buffer).
    """
    global _display
    if terminal is None:
        terminal = console is not None or sys.stderr.isatty()
    opened_display = False
    if terminal and _display is None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        _display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            console=console or Console(stderr=True), transient=False)
        _display.start()
        opened_display = True
    bar = Bar(label, total, unit, line, terminal, _every())
    ok = False
    try:
        yield bar
        ok = True
    finally:
        bar._finish(ok)
        if opened_display:
            _display.stop()  # type: ignore[union-attr]
            _display = None


def track(items: Iterable[T], label: str, total: int | None = None, *, unit: str = "items",
          line: Line | None = None, terminal: bool | None = None) -> Iterator[T]:
    """Iterate ``items`` under a progress bar (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(label, total, unit=unit, line=line, terminal=terminal) as bar:
        for item in items:
            yield item
            bar.advance()
