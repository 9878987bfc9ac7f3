"""Several OS processes, each with its own pool and batching writer, append to
the same database at once.  Afterwards the log must be exactly positions
1..N, every chain link must recompute, no aggregate version may appear
twice, and every receipt any process was given must be in the log as given."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from uuid import UUID, uuid4

from contracts.events import OptOutRegistered
from contracts.values import Actor
from service.audit.chain import verify_database
from service.store.database import Database

PROCESSES = 4
TASKS_PER_PROCESS = 12
SECONDS = 3.0
MAX_APPENDS_PER_TASK = 400
MAX_RETRIES = 200
SHARED = [UUID(int=i + 1) for i in range(3)]


def _event(aggregate_id: UUID, version: int, writer: str):
    from service.store.event_log import NewEvent

    return NewEvent(
        event_id=uuid4(), event_type="OptOutRegistered", aggregate_id=aggregate_id, aggregate_version=version,
        payload=OptOutRegistered(nhs_number="9434765919", scope="national", channel="app",
                                 actor=Actor(kind="patient"), recorded_by=writer),
    )


async def _write(dsn: str, writer: str, barrier, seconds: float) -> dict:
    from service.store.event_store import EventStore
    from service.store.event_log import VersionConflict

    pool = await Database(owner_dsn=dsn, embedded=False).create_pool(min_size=2, max_size=4)
    store = EventStore(pool, queue_size=1000, max_batch=200)
    store.start()
    receipts: list[tuple] = []
    conflicts = 0

    async def fresh(task: int) -> None:
        for n in range(MAX_APPENDS_PER_TASK):
            if time.monotonic() > deadline:
                return
            agg = uuid4()
            events = [_event(agg, 1, writer)] + ([_event(agg, 2, writer)] if n % 5 == 0 else [])
            result = await store.append(events)
            receipts.extend((r.position, r.event_id, r.leaf_hash, r.chain_hash, str(e.aggregate_id),
                             e.aggregate_version) for r, e in zip(result.receipts, events, strict=True))

    async def contended(task: int) -> None:
        nonlocal conflicts
        agg = SHARED[(task // 3) % len(SHARED)]
        for _ in range(MAX_APPENDS_PER_TASK):
            if time.monotonic() > deadline:
                return
            for _ in range(MAX_RETRIES):
                async with pool.acquire() as conn:
                    version = await conn.fetchval(
                        "SELECT coalesce(max(aggregate_version), 0) FROM ledger_events WHERE aggregate_id = $1", agg)
                event = _event(agg, version + 1, writer)
                try:
                    (r,) = (await store.append([event])).receipts
                except VersionConflict:
                    conflicts += 1
                    continue
                receipts.append((r.position, r.event_id, r.leaf_hash, r.chain_hash, str(agg), version + 1))
                break
            else:
                raise AssertionError("a contended append never got through")

    # Everyone starts together so the writers really overlap.
    await asyncio.to_thread(barrier.wait, 60)
    deadline = time.monotonic() + seconds
    try:
        await asyncio.gather(*((contended if t % 3 == 0 else fresh)(t) for t in range(TASKS_PER_PROCESS)))
    finally:
        await store.stop()
        await pool.close()
    return {"writer": writer, "receipts": receipts, "conflicts": conflicts}


def writer_process(dsn: str, writer: str, barrier, results, seconds: float) -> None:
    try:
        results.put(asyncio.run(_write(dsn, writer, barrier, seconds)))
    except BaseException as exc:  # noqa: BLE001 - report to the parent instead of dying silently
        results.put({"writer": writer, "error": repr(exc)})


async def test_parallel_processes_never_fork_or_gap_the_log(database: Database):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=writer_process, args=(database.owner_dsn, f"writer-{i}", barrier, results, SECONDS))
        for i in range(PROCESSES)
    ]
    for p in processes:
        p.start()
    outcomes = []
    try:
        for _ in processes:
            outcomes.append(await asyncio.to_thread(results.get, True, 120))
    except queue.Empty:
        raise AssertionError(f"writers did not finish; got {len(outcomes)} of {PROCESSES}") from None
    finally:
        for p in processes:
            await asyncio.to_thread(p.join, 30)
            if p.is_alive():
                p.kill()
    errors = [o for o in outcomes if "error" in o]
    print(f"writers: {[(o['writer'], len(o.get('receipts', [])), o.get('conflicts')) for o in outcomes]}")
    assert not errors, errors
    assert all(p.exitcode == 0 for p in processes)

    given = {r[0]: r for o in outcomes for r in o["receipts"]}
    assert len(given) == sum(len(o["receipts"]) for o in outcomes), "two receipts share a position"

    conn = await database.connect_owner()
    try:
        rows = await conn.fetch(
            "SELECT position, event_id, leaf_hash, chain_hash, aggregate_id, aggregate_version"
            " FROM ledger_events ORDER BY position")
        duplicates = await conn.fetch(
            "SELECT aggregate_id, aggregate_version FROM ledger_events"
            " GROUP BY aggregate_id, aggregate_version HAVING count(*) > 1")
        gaps = await conn.fetch(
            "SELECT aggregate_id FROM ledger_events GROUP BY aggregate_id"
            " HAVING max(aggregate_version) <> count(*) OR min(aggregate_version) <> 1")
        writers_per_shared = await conn.fetch(
            "SELECT aggregate_id, count(DISTINCT entry->'payload'->>'recorded_by') AS writers"
            " FROM (SELECT aggregate_id, convert_from(entry, 'UTF8')::jsonb AS entry FROM ledger_events) e"
            " WHERE aggregate_id = ANY($1::uuid[]) GROUP BY aggregate_id", SHARED)
        verified = await verify_database(conn)
    finally:
        await conn.close()

    n = len(rows)
    assert n > PROCESSES * TASKS_PER_PROCESS, "the writers hardly wrote anything"
    assert [r["position"] for r in rows] == list(range(1, n + 1))
    assert verified.failure is None, str(verified.failure)
    assert verified.size == n
    assert not duplicates and not gaps
    # Every entry in the log was answered to exactly one writer, as stored.
    assert sorted(given) == list(range(1, n + 1))
    for row in rows:
        position, event_id, leaf, chain, aggregate_id, version = given[row["position"]]
        assert event_id == str(row["event_id"])
        assert leaf == bytes(row["leaf_hash"]).hex() and chain == bytes(row["chain_hash"]).hex()
        assert (aggregate_id, version) == (str(row["aggregate_id"]), row["aggregate_version"])
    # The contended aggregates really were written by several processes.
    assert len(writers_per_shared) == len(SHARED)
    assert all(r["writers"] >= 2 for r in writers_per_shared), [dict(r) for r in writers_per_shared]
