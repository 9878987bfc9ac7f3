"""The event store: one batching writer per process over a hash-chained log.

Every append goes through a bounded queue to a single writer task.  The
writer takes whatever is queued, locks the chain-head row once, checks each
item (idempotency key, aggregate version, append condition) so that a bad
item is refused alone, then writes the accepted items with consecutive
positions and their hash links in one transaction, and NOTIFYs listeners.

Because every writer in every process holds the head-row lock from reading
the head until commit, positions are gap-free and commit-ordered: a reader
that has seen position N never later finds a new entry below N.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import asyncpg
import numpy as np
import structlog

from contracts import cohort as cohort_codec
from contracts.bodies import Receipt
from contracts.entry import (
    chain_hash,
    decode_entry,
    encode_entry,
    format_recorded_at,
    leaf_hash,
)
from projections.runner import NOTIFY_CHANNEL
from service.store import append_checks, cohorts, tiles
from service.store.append_checks import Pending
from service.store.event_log import (
    AppendCondition,
    AppendResult,
    EventLog,
    IdempotencyConflict,
    IdempotencyKey,
    NewEvent,
    SideWrite,
    StoreBusy,
    StoredEvent,
    StoreUnavailable,
)

log = structlog.get_logger(__name__)



class _CommitOutcomeUnknown(Exception):
    """COMMIT was sent but its answer never came back."""




_STOP: Any = object()  # queued by stop(): everything before it is still written

_SELECT = "SELECT entry, leaf_hash, chain_hash FROM ledger_events"


# Binary search in one round trip.  recorded_at is the last member of the JCS
# entry: its 27 characters end 2 bytes before the end (`"}`), and that fixed-width
# RFC 3339 form orders like the instants it names.
_POSITION_AT = """
WITH RECURSIVE search(lo, hi) AS (
    SELECT 0::bigint, $1::bigint
    UNION ALL
    SELECT CASE WHEN later THEN lo ELSE mid END, CASE WHEN later THEN mid - 1 ELSE hi END
    FROM (SELECT lo, hi, (lo + hi + 1) / 2 AS mid FROM search WHERE lo < hi) step,
         LATERAL (SELECT substring(entry FROM length(entry) - 28 FOR 27) > $2::bytea AS later
                  FROM ledger_events WHERE position = step.mid) probe
)
SELECT min(hi) FROM search
"""


def _stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(decode_entry(row["entry"]), bytes(row["leaf_hash"]), bytes(row["chain_hash"]))


class EventStore(EventLog):
    def __init__(self, pool: asyncpg.Pool, *, queue_size: int = 10_000, max_batch: int = 500):
        self._pool = pool
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=queue_size)
        self._max_batch = max_batch
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def stop(self) -> None:
        """Refuse new appends, write everything already queued, then stop.

        The writer is never cancelled mid-batch: a cancelled batch would leave
        its callers waiting for receipts that never come."""
        if self._task is None:
            return
        self._closing = True
        await self._queue.put(_STOP)
        await self._task
        self._task = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # --- writing --------------------------------------------------------------

    async def append(
        self,
        events: list[NewEvent],
        *,
        condition: AppendCondition | None = None,
        idempotency: IdempotencyKey | None = None,
        side_write: SideWrite | None = None,
    ) -> AppendResult:
        if not events:
            raise ValueError("nothing to append")
        if self._closing or not self.running:
            raise StoreUnavailable("the ledger writer is not running")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(Pending(events, condition, idempotency, side_write, future))
        except asyncio.QueueFull:
            raise StoreBusy("the write queue is full") from None
        return await future

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            # A caller that gave up (its request timed out) before the batch
            # began is not written: it was told the write may not have landed.
            batch = [item for item in batch if not item.future.cancelled()]
            if not batch:
                continue
            try:
                await self._write(batch)
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets an answer
                unknown = isinstance(exc, _CommitOutcomeUnknown)
                cause = exc.__cause__ if unknown else exc
                log.error("ledger batch failed", error=repr(cause), batch_size=len(batch), outcome_unknown=unknown)
                failure = (
                    StoreUnavailable("the database connection was lost while the write was committing",
                                     outcome_unknown=True) if unknown
                    else StoreUnavailable("the ledger could not commit the write")  # rolled back: nothing landed
                )
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(failure)

    async def _write(self, batch: list[Pending]) -> None:
        conn = await self._pool.acquire()
        try:
            async with _committing(conn):
                head = await conn.fetchrow(
                    "SELECT h.position, h.chain_hash, e.recorded_at FROM ledger_head h"
                    " LEFT JOIN ledger_events e ON e.position = h.position FOR UPDATE OF h")
                position, chain = head["position"], bytes(head["chain_hash"])
                tree_size = position
                known_keys = await append_checks.known_keys(conn, batch)
                versions = await append_checks.versions(conn, batch)
                newer = await append_checks.events_after(conn, batch)

                # Never earlier than the entry before: "the state at an instant" is
                # then a prefix of the log (a clock stepping back, or another
                # process's clock, cannot reorder time).
                recorded = max(datetime.now(timezone.utc), head["recorded_at"] or datetime.min.replace(tzinfo=timezone.utc))
                recorded_at = format_recorded_at(recorded)
                rows: list[tuple[Any, ...]] = []
                accepted: list[Pending] = []
                written: list[tuple[int, str, Any]] = []
                for item in batch:
                    refusal = append_checks.refusal(item, known_keys, versions, newer, written)
                    if refusal is not None:
                        # A caller that gave up (cancelled) has no one to tell;
                        # setting its future would abort everyone's batch.
                        if not item.future.done():
                            item.future.set_exception(refusal)
                        continue
                    accepted.append(item)
                    if item.replay_of is not None:
                        continue
                    for event in item.events:
                        position += 1
                        entry = encode_entry(
                            position=position,
                            event_id=event.event_id,
                            event_type=event.event_type,
                            aggregate_id=event.aggregate_id,
                            aggregate_version=event.aggregate_version,
                            recorded_at=recorded_at,
                            payload=event.payload,
                        )
                        leaf = leaf_hash(entry)
                        chain = chain_hash(chain, leaf)
                        rows.append((
                            position, event.event_id, event.event_type, event.aggregate_id,
                            event.aggregate_version, recorded, entry, leaf, chain,
                        ))
                        versions[event.aggregate_id] = event.aggregate_version
                        written.append((position, event.event_type, event.payload))
                        item.positions.append(position)
                    if item.idempotency is not None:
                        k = item.idempotency
                        known_keys[(k.scope, k.key)] = (k.request_hash, item.positions)

                if rows:
                    await conn.copy_records_to_table(
                        "ledger_events",
                        records=rows,
                        columns=[
                            "position", "event_id", "event_type", "aggregate_id",
                            "aggregate_version", "recorded_at", "entry", "leaf_hash", "chain_hash",
                        ],
                    )
                    await tiles.extend(conn, tree_size, position)
                    fresh = [i for i in accepted if i.replay_of is None]
                    keys = [(k.scope, k.key, k.request_hash, i.positions) for i in fresh if (k := i.idempotency)]
                    if keys:
                        await conn.executemany(
                            "INSERT INTO ledger_idempotency (scope, key, request_hash, positions)"
                            " VALUES ($1, $2, $3, $4)",
                            keys,
                        )
                    for item in fresh:
                        if item.side_write is not None:
                            await item.side_write(conn)
                    await conn.execute(
                        "UPDATE ledger_head SET position = $1, chain_hash = $2", position, chain
                    )
                    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(position))
                by_position = {r[0]: r for r in rows}
                replays = sorted({p for i in accepted if i.replay_of for p in i.replay_of})
                stored = {s.position: s for s in await self._read_positions(conn, replays)} if replays else {}
        finally:
            await _release(self._pool, conn)
        # Committed: only now may anyone learn their receipt.
        for item in accepted:
            if item.future.done():
                continue
            if item.replay_of is not None:
                item.future.set_result(AppendResult([stored[p].receipt() for p in item.replay_of], replayed=True))
            else:
                item.future.set_result(AppendResult([_receipt(by_position[p], recorded_at) for p in item.positions]))

    # --- reading --------------------------------------------------------------

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection reading one consistent state of the log (repeatable
        read, read-only), for the reads below that take ``conn``."""
        async with self._pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                yield conn

    async def history(self, aggregate_id: UUID) -> list[StoredEvent]:
        async with self._pool.acquire() as conn:
            return await self.aggregate_events(conn, aggregate_id)

    async def entry_bytes(self, after: int, through: int) -> list[bytes] | None:
        """The encoded entries after ``after`` through ``through``; None if the log is shorter."""
        async with self._pool.acquire() as conn:
            if await conn.fetchval("SELECT position FROM ledger_head") < through:
                return None
            rows = await conn.fetch("SELECT entry FROM ledger_events WHERE position > $1 AND position <= $2"
                                    " ORDER BY position", after, through)
        return [bytes(r["entry"]) for r in rows]

    async def entries_of_types(self, types: Sequence[str], after: int, through: int,
                               limit: int) -> list[tuple[int, str, bytes, bytes]]:
        """(position, event type, entry bytes, leaf hash) of entries of ``types`` in (after, through]."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT position, event_type, entry, leaf_hash FROM ledger_events WHERE event_type = ANY($1)"
                " AND position > $2 AND position <= $3 ORDER BY position LIMIT $4", list(types), after, through, limit)
        return [(r["position"], r["event_type"], bytes(r["entry"]), bytes(r["leaf_hash"])) for r in rows]

    async def store_removed(self, call_id: str, stems: np.ndarray) -> None:
        await cohorts.store_removed(self._pool, call_id, *cohort_codec.encode_members(stems))

    async def removed_members(self, call_id: str) -> tuple[str, bytes] | None:
        return await cohorts.removed(self._pool, call_id)

    async def cohort_members(self, cohort_id: str, holder: str | None = None) -> tuple[str, bytes] | None:
        return await cohorts.members(self._pool, cohort_id, holder)

    async def holds_cohort(self, cohort_id: str, organisation: str) -> bool:
        return await cohorts.held_by(self._pool, cohort_id, organisation)

    async def head(self, conn: asyncpg.Connection | None = None) -> tuple[int, bytes]:
        if conn is None:
            async with self._pool.acquire() as conn:
                return await self.head(conn)
        row = await conn.fetchrow("SELECT position, chain_hash FROM ledger_head")
        return row["position"], bytes(row["chain_hash"])

    async def position_at(self, conn: asyncpg.Connection, instant: datetime, head: int) -> int:
        """The last position at or below ``head`` recorded at or before ``instant``
        (0 if none), by binary search over the entries' own ``recorded_at``
        (never decreasing along the log)."""
        return await conn.fetchval(_POSITION_AT, head, format_recorded_at(instant).encode())

    async def aggregate_events(self, conn: asyncpg.Connection, aggregate_id: UUID) -> list[StoredEvent]:
        rows = await conn.fetch(
            f"{_SELECT} WHERE aggregate_id = $1 ORDER BY aggregate_version", aggregate_id
        )
        return [_stored(r) for r in rows]

    async def aggregates_events(
        self, conn: asyncpg.Connection, aggregate_ids: Iterable[UUID], up_to: int
    ) -> list[StoredEvent]:
        rows = await conn.fetch(
            f"{_SELECT} WHERE aggregate_id = ANY($1::uuid[]) AND position <= $2 ORDER BY position",
            list(aggregate_ids),
            up_to,
        )
        return [_stored(r) for r in rows]

    async def read_positions(self, positions: Sequence[int]) -> list[StoredEvent]:
        async with self._pool.acquire() as conn:
            return await self._read_positions(conn, positions)

    @staticmethod
    async def _read_positions(conn: asyncpg.Connection, positions: Sequence[int]) -> list[StoredEvent]:
        rows = await conn.fetch(
            f"{_SELECT} WHERE position = ANY($1::bigint[]) ORDER BY position", list(positions)
        )
        return [_stored(r) for r in rows]

    async def read_after(self, after: int, limit: int) -> list[StoredEvent]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"{_SELECT} WHERE position > $1 ORDER BY position LIMIT $2", after, limit
            )
        return [_stored(r) for r in rows]

    async def find_idempotent(self, key: IdempotencyKey) -> AppendResult | None:
        """The earlier result for this key, IdempotencyConflict if the request differs."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT request_hash, positions FROM ledger_idempotency WHERE scope = $1 AND key = $2",
                key.scope,
                key.key,
            )
            if row is None:
                return None
            if bytes(row["request_hash"]) != key.request_hash:
                raise IdempotencyConflict("this Idempotency-Key was used with a different request")
            stored = await self._read_positions(conn, row["positions"])
        return AppendResult([s.receipt() for s in stored], replayed=True)


@asynccontextmanager
async def _committing(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction like ``conn.transaction()``, except that a failure of
    the COMMIT itself is told apart (``_CommitOutcomeUnknown``): until then
    nothing is committed, after it the server may have committed."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except BaseException:
        if not conn.is_closed():
            try:
                await transaction.rollback()
            except Exception:  # noqa: BLE001 - the connection is going; the server rolls back
                pass
        raise
    try:
        await transaction.commit()
    except Exception as exc:
        raise _CommitOutcomeUnknown() from exc


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Give the connection back; if that fails the pool has already closed
    it, and the batch's outcome (committed or not) must not change."""
    try:
        await pool.release(conn)
    except Exception as exc:  # noqa: BLE001
        log.warning("releasing a database connection failed", error=repr(exc))


def _receipt(row: tuple[Any, ...], recorded_at: str) -> Receipt:
    position, event_id, event_type, _, _, _, _, leaf, chain = row
    return Receipt(
        position=position,
        event_id=str(event_id),
        event_type=event_type,
        recorded_at=recorded_at,
        leaf_hash=leaf.hex(),
        chain_hash=chain.hex(),
    )
