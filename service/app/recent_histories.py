"""The histories of recently written aggregates, held in memory so that a
write can be decided without reading the ledger first.

What is held may be stale (another process wrote since, or this process
never saw the aggregate and starts from an empty history): the ledger
writer's version check refuses an append decided on a stale history, and
the command is then decided again from the ledger. A decision that writes
nothing is never trusted to a held history (see ``Ledger._execute``).
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID


class HeldEvent(NamedTuple):
    event_type: str
    version: int
    recorded_at: datetime
    payload: Any
    position: int


class RecentHistories:
    """Least-recently-used histories, by aggregate id; bounded by ``capacity``
    aggregates (a patient's history is a handful of events)."""

    def __init__(self, capacity: int = 100_000):
        self._capacity = capacity
        self._held: OrderedDict[UUID, tuple[HeldEvent, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def get(self, aggregate_id: UUID) -> tuple[HeldEvent, ...]:
        """The held history; empty if none is held (a guess the writer checks)."""
        history = self._held.get(aggregate_id, ())
        if history:
            self._held.move_to_end(aggregate_id)
        return history

    def put(self, aggregate_id: UUID, history: tuple[HeldEvent, ...]) -> None:
        if self._capacity <= 0:
            return
        self._held[aggregate_id] = history
        self._held.move_to_end(aggregate_id)
        while len(self._held) > self._capacity:
            self._held.popitem(last=False)

    def extend(self, aggregate_id: UUID, base: tuple[HeldEvent, ...], new: list[HeldEvent]) -> None:
        """Record events just appended after ``base``; a history that moved
        meanwhile (a concurrent write in this process) is dropped instead."""
        if self._held.get(aggregate_id, ()) != base:
            self._held.pop(aggregate_id, None)
            return
        self.put(aggregate_id, base + tuple(new))

    def forget(self, aggregate_id: UUID) -> None:
        self._held.pop(aggregate_id, None)
