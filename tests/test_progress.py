"""Progress: plain lines off a terminal, a rich bar on one, nested bars sharing the display."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from segtune.progress import EVERY_ENV, progress, track


def test_plain_lines_count_and_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "0")
    lines: list[str] = []
    with progress("encoding images", total=4, unit="images", line=lines.append,
                  terminal=False) as bar:
        bar.advance(1)
        bar.advance(3)
    assert lines[0].startswith("encoding images: 1/4 images (25%)") and "left" in lines[0]
    assert lines[1].startswith("encoding images: 4/4 images (100%)")
    assert lines[-1].startswith("encoding images: done, 4 images in ")


def test_plain_lines_are_throttled_and_say_when_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "3600")
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt), progress("scoring", total=100, line=lines.append,
                                                   terminal=False) as bar:
        for _ in range(50):
            bar.advance()
        raise KeyboardInterrupt
    assert lines == [lines[-1]] and lines[-1].startswith("scoring: stopped after 50 items")


def test_terminal_bar_draws_counts_and_nested_bars_share_it() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with progress("outer", total=2, console=console) as outer:
        outer.advance()
        assert list(track(range(3), "inner", terminal=True)) == [0, 1, 2]
        outer.advance()
    text = out.getvalue()
    assert "outer" in text and "2/2" in text and "inner" in text and "3/3" in text


def test_track_without_length_counts_items(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "0")
    lines: list[str] = []
    got = list(track((i for i in range(3)), "reading", line=lines.append, terminal=False))
    assert got == [0, 1, 2]
    assert lines[-1].startswith("reading: done, 3 items")
    assert lines[0].startswith("reading: 1 items,")
