"""Progress of a long command (verify, export, demo, projections rebuild) on stderr.

On a terminal: a live bar (rich) with the count, rate and time left.
Elsewhere (CI logs, files, pipes): a plain line every
``CONSENT_LEDGER_PROGRESS_SECONDS`` and one at the end, so logs stay readable.
stdout carries only the command's result.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

from service import config as config_module


class Progress:
    """Count work done towards an optional total.  ``advance`` is cheap
    enough to call once per entry: the clock is read only every ``_step``
    items, and the display is redrawn at most ten times a second."""

    def __init__(self, what: str, total: int | None = None, *, unit: str = "entries",
                 stream: IO[str] | None = None, every: float | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.stream = sys.stderr if stream is None else stream
        self.every = config_module.load().progress_seconds if every is None else every
        self.done = 0
        self.started = self._last_line = time.monotonic()
        self._next_check = 0
        self._lines = 0
        self._bar: Any = None
        self._task: Any = None
        if self.stream.isatty():
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar
        from rich.text import Text

        unit = self.unit

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} {unit}/s" if speed else f"? {unit}/s")

        self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                        Rate(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                        console=Console(file=self.stream), refresh_per_second=10)
        self._bar.start()
        self._task = self._bar.add_task(self.what, total=self.total)

    @property
    def _step(self) -> int:
        return max(1, (self.total or 0) // 1000) if self.total else 256

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self._next_check:
            self._show()

    def update(self, done: int, total: int | None = None) -> None:
        """Absolute progress (and a total learnt on the way)."""
        if total is not None:
            self.total = total
        self.done = done
        self._show()

    def _show(self) -> None:
        self._next_check = self.done + self._step
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        seconds = now - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        if final:
            text = f"{self.what}: {self.done:,} {self.unit} in {seconds:.1f} s ({rate:,.0f} {self.unit}/s)"
        else:
            text = f"{self.what}: {self.done:,}"
            if self.total:
                text += f"/{self.total:,} {self.unit} ({100 * self.done // self.total}%)"
            else:
                text += f" {self.unit}"
            text += f", {rate:,.0f} {self.unit}/s"
            if self.total and rate > 0:
                text += f", about {_duration((self.total - self.done) / rate)} left"
        self.stream.write(text + "\n")
        self.stream.flush()
        self._lines += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total or self.done)
            self._bar.stop()
            self._bar = None
        elif self._lines:  # a closing line only after periodic ones: a short command stays quiet
            self._line(time.monotonic(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
