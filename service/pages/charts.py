"""Bar charts as plain numbers for an SVG template: no chart library, no script.

Each row is a label above its bar. A value of ``None`` is suppressed (fewer
than 10 patients): its bar is not drawn and its label says so."""

from __future__ import annotations

from dataclasses import dataclass

WIDTH = 720
VALUE_ROOM = 110  # after the longest bar, for its figure
ROW = 44


@dataclass(frozen=True)
class Bar:
    label: str
    series: str
    value: int | None
    y: float
    width: float


@dataclass(frozen=True)
class Chart:
    title: str
    bars: list[Bar]
    series: list[str]

    @property
    def width(self) -> int:
        return WIDTH

    @property
    def height(self) -> int:
        return max(1, len(self.bars)) * ROW

    @property
    def drawn(self) -> list[Bar]:
        """The bars with a height on the page: not zero, not suppressed."""
        return [b for b in self.bars if b.value]


def horizontal(title: str, rows: list[tuple[str, str, int | None]], series: list[str]) -> Chart:
    """One bar per (label, series, value), each on its own row, scaled to the largest value."""
    largest = max((v for _, _, v in rows if v), default=0)
    span = WIDTH - VALUE_ROOM
    return Chart(title, [Bar(label, kind, value, i * ROW, max(2.0, span * value / largest) if value else 0.0)
                         for i, (label, kind, value) in enumerate(rows)], series)
