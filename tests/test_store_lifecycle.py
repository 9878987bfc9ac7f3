"""The batching writer when callers give up or the service shuts down:
one caller's cancellation must not fail the others' writes, and a graceful
stop must answer every write already taken from the queue."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import asyncpg

from contracts.events import OptOutRegistered
from contracts.values import Actor
from service.audit.chain import verify_database
from service.store.event_store import EventStore
from service.store.event_log import NewEvent


def opt_out(aggregate_id, version: int) -> NewEvent:
    return NewEvent(uuid4(), "OptOutRegistered", aggregate_id, version, OptOutRegistered(
        nhs_number="9434765919", scope="national", channel="app", actor=Actor(kind="patient"), recorded_by="t"))


async def test_a_cancelled_refused_caller_does_not_fail_its_batch(store: EventStore):
    agg = uuid4()
    await store.append([opt_out(agg, 1)])
    stale = asyncio.create_task(store.append([opt_out(agg, 1)]))  # will be refused
    good = [asyncio.create_task(store.append([opt_out(uuid4(), 1)])) for _ in range(5)]
    await asyncio.sleep(0)  # all queued; the writer is still reading the head
    stale.cancel()
    results = await asyncio.gather(*good)
    assert sorted(r.receipts[0].position for r in results) == [2, 3, 4, 5, 6]


async def test_a_cancelled_accepted_caller_does_not_fail_its_batch(store: EventStore):
    gone = asyncio.create_task(store.append([opt_out(uuid4(), 1)]))
    good = [asyncio.create_task(store.append([opt_out(uuid4(), 1)])) for _ in range(5)]
    await asyncio.sleep(0)
    gone.cancel()
    results = await asyncio.gather(*good)
    assert len({r.receipts[0].position for r in results}) == 5


async def test_stop_answers_the_batch_in_flight(pool: asyncpg.Pool):
    store = EventStore(pool, queue_size=1000, max_batch=500)
    store.start()
    writes = [asyncio.create_task(store.append([opt_out(uuid4(), 1)])) for _ in range(50)]
    await asyncio.sleep(0)  # the writer has taken them all as one batch
    await store.stop()
    done, pending = await asyncio.wait(writes, timeout=10)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} writes were never answered"
    assert sorted(t.result().receipts[0].position for t in done) == list(range(1, 51))
    async with pool.acquire() as conn:
        assert (await verify_database(conn)).size == 50
