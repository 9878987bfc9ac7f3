"""The event log port: what the application may ask of the ledger's log,
whatever keeps it. ``store.event_store.EventStore`` is the PostgreSQL
adapter; ``tests/test_event_log.py`` is the contract every adapter passes.

An append is all-or-nothing and is refused, alone, when an event's aggregate
version is not the next one (``VersionConflict``), when its condition sees a
newer event that invalidates the decision (``ConditionFailed``), or when its
idempotency key was used for another request (``IdempotencyConflict``); a
key used for the same request answers with the first append's receipts.
Positions are gap-free and commit-ordered, each entry's chain hash links it
to the one before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from contracts.bodies import Receipt
from contracts.entry import Entry


class StoreError(Exception):
    """Base of the errors an append can end with."""


class VersionConflict(StoreError):
    """Another write changed the aggregate since it was loaded."""


class ConditionFailed(StoreError):
    """The append condition saw a newer event that invalidates the decision."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class IdempotencyConflict(StoreError):
    """The idempotency key was used before with a different request."""


class StoreBusy(StoreError):
    """The write queue is full; the caller should retry later."""


class StoreUnavailable(StoreError):
    """The write was not committed, or (``outcome_unknown``) the connection
    was lost while it committed, so it may or may not have been.  Either
    way a retry with the same idempotency key is safe."""

    def __init__(self, reason: str, *, outcome_unknown: bool = False):
        super().__init__(reason)
        self.outcome_unknown = outcome_unknown


@dataclass(frozen=True)
class NewEvent:
    event_id: UUID
    event_type: str
    aggregate_id: UUID
    aggregate_version: int
    payload: Any

    @classmethod
    def alone(cls, payload: Any) -> NewEvent:
        """An event that is its own aggregate (a read, a filter call, a stored
        cohort): its type is its payload's contract class."""
        return cls(uuid4(), type(payload).__name__, uuid4(), 1, payload)


@dataclass(frozen=True)
class AppendCondition:
    """Refuse the append if an event of ``event_types`` after ``after`` makes
    ``violated`` return a reason (a dynamic consistency boundary)."""

    after: int
    event_types: frozenset[str]
    violated: Callable[[Sequence[tuple[str, Any]]], str | None]


@dataclass(frozen=True)
class IdempotencyKey:
    scope: str
    key: str
    request_hash: bytes


@dataclass(frozen=True)
class AppendResult:
    receipts: list[Receipt]
    replayed: bool = False


SideWrite = Callable[[asyncpg.Connection], Awaitable[None]]


@dataclass(frozen=True)
class StoredEvent:
    entry: Entry
    leaf_hash: bytes
    chain_hash: bytes

    @property
    def position(self) -> int:
        return self.entry.position

    def receipt(self) -> Receipt:
        return Receipt(
            position=self.entry.position,
            event_id=self.entry.event_id,
            event_type=self.entry.event_type,
            recorded_at=self.entry.recorded_at,
            leaf_hash=self.leaf_hash.hex(),
            chain_hash=self.chain_hash.hex(),
        )


class EventLog(ABC):
    """The log, as the application uses it."""

    @abstractmethod
    async def append(
        self,
        events: list[NewEvent],
        *,
        condition: AppendCondition | None = None,
        idempotency: IdempotencyKey | None = None,
        side_write: SideWrite | None = None,
    ) -> AppendResult:
        """Append ``events`` at the head, atomically, or raise a StoreError."""

    @abstractmethod
    async def head(self) -> tuple[int, bytes]:
        """The last position and its chain hash ((0, 32 zero bytes) when empty)."""

    @abstractmethod
    async def read_after(self, after: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` entries after ``after``, in position order."""

    @abstractmethod
    async def read_positions(self, positions: Sequence[int]) -> list[StoredEvent]:
        """The entries at ``positions`` (those that exist), in position order."""

    @abstractmethod
    async def find_idempotent(self, key: IdempotencyKey) -> AppendResult | None:
        """The first result for ``key``; IdempotencyConflict if it was another request."""
