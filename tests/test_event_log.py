"""The event log contract (service/store/event_log.py): every adapter of the
port passes these, through the port's methods only, in the style of the
eventsourcing library's recorder tests. Adapter-specific guarantees (roles,
triggers, bytes on disk) are tested beside the adapter (test_store.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest

from contracts.entry import GENESIS_CHAIN_HASH, chain_hash
from contracts.events import AccessRevoked, OptOutRegistered
from contracts.values import Actor
from service.store.event_log import (
    AppendCondition,
    ConditionFailed,
    EventLog,
    IdempotencyConflict,
    IdempotencyKey,
    NewEvent,
    VersionConflict,
)
from service.store.event_store import EventStore


def opt_out(aggregate_id, version: int, nhs: str = "9434765919") -> NewEvent:
    payload = OptOutRegistered(nhs_number=nhs, scope="national", channel="app", actor=Actor(kind="patient"),
                               recorded_by="test")
    return NewEvent(uuid4(), "OptOutRegistered", aggregate_id, version, payload)


@pytest.fixture(params=["postgresql"])
async def log(request, pool: asyncpg.Pool) -> AsyncIterator[EventLog]:
    """Each adapter of the port; add one here and it must pass every test below."""
    store = EventStore(pool, queue_size=1000, max_batch=200)
    store.start()
    yield store
    await store.stop()


async def test_an_empty_log_has_the_genesis_head(log: EventLog):
    assert await log.head() == (0, GENESIS_CHAIN_HASH)
    assert await log.read_after(0, 10) == []


async def test_positions_are_consecutive_and_each_chain_hash_links_to_the_one_before(log: EventLog):
    agg = uuid4()
    receipts = [(await log.append([opt_out(agg, v)])).receipts[0] for v in (1, 2, 3)]
    assert [r.position for r in receipts] == [1, 2, 3]
    stored = await log.read_after(0, 10)
    previous = GENESIS_CHAIN_HASH
    for s, r in zip(stored, receipts, strict=True):
        previous = chain_hash(previous, s.leaf_hash)
        assert s.chain_hash == previous and s.receipt() == r
    assert await log.head() == (3, previous)
    assert [s.position for s in await log.read_after(1, 1)] == [2]
    assert [s.position for s in await log.read_positions([3, 1, 99])] == [1, 3]


async def test_one_append_of_several_events_is_whole(log: EventLog):
    agg = uuid4()
    result = await log.append([opt_out(agg, 1), opt_out(agg, 2)])
    assert [r.position for r in result.receipts] == [1, 2]
    with pytest.raises(VersionConflict):
        await log.append([opt_out(agg, 3), opt_out(agg, 3)])  # the second is stale: neither is written
    assert (await log.head())[0] == 2


async def test_concurrent_appends_get_gap_free_positions(log: EventLog):
    results = await asyncio.gather(*(log.append([opt_out(uuid4(), 1)]) for _ in range(300)))
    assert sorted(r.receipts[0].position for r in results) == list(range(1, 301))
    assert [s.position for s in await log.read_after(0, 1000)] == list(range(1, 301))


async def test_a_version_that_is_not_the_next_is_refused_and_writes_nothing(log: EventLog):
    agg = uuid4()
    await log.append([opt_out(agg, 1)])
    with pytest.raises(VersionConflict):
        await log.append([opt_out(agg, 1)])
    with pytest.raises(VersionConflict):
        await log.append([opt_out(agg, 3)])
    assert (await log.head())[0] == 1


async def test_a_refused_item_does_not_take_others_down_with_it(log: EventLog):
    agg = uuid4()
    await log.append([opt_out(agg, 1)])
    outcomes = await asyncio.gather(
        log.append([opt_out(uuid4(), 1)]),
        log.append([opt_out(agg, 1)]),  # stale
        log.append([opt_out(uuid4(), 1)]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], VersionConflict)
    assert sorted(o.receipts[0].position for o in (outcomes[0], outcomes[2])) == [2, 3]


async def test_a_retried_key_answers_with_the_first_receipts_and_another_request_is_refused(log: EventLog):
    key = IdempotencyKey("caller", "k-1", b"hash-a")
    assert await log.find_idempotent(key) is None
    first = await log.append([opt_out(uuid4(), 1)], idempotency=key)
    again = await log.append([opt_out(uuid4(), 1)], idempotency=key)
    assert again.replayed and again.receipts == first.receipts
    assert (await log.find_idempotent(key)).receipts == first.receipts
    with pytest.raises(IdempotencyConflict):
        await log.append([opt_out(uuid4(), 1)], idempotency=IdempotencyKey("caller", "k-1", b"hash-b"))
    with pytest.raises(IdempotencyConflict):
        await log.find_idempotent(IdempotencyKey("caller", "k-1", b"hash-b"))
    # The same key from another caller is another key.
    other = await log.append([opt_out(uuid4(), 1)], idempotency=IdempotencyKey("other", "k-1", b"hash-b"))
    assert not other.replayed
    assert (await log.head())[0] == 2


async def test_the_same_key_racing_writes_once(log: EventLog):
    key = IdempotencyKey("caller", "race", b"h")
    results = await asyncio.gather(*(log.append([opt_out(uuid4(), 1)], idempotency=key) for _ in range(10)))
    assert len({r.receipts[0].position for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert (await log.head())[0] == 1


async def test_an_append_condition_sees_events_after_its_position(log: EventLog):
    await log.append([opt_out(uuid4(), 1)])  # position 1
    await log.append([NewEvent.alone(AccessRevoked(grant_id="G1", reason="ended", recorded_by="dac"))])  # 2

    def violated(events):
        return "revoked" if any(t == "AccessRevoked" and p.grant_id == "G1" for t, p in events) else None

    condition = AppendCondition(after=1, event_types=frozenset({"AccessRevoked"}), violated=violated)
    with pytest.raises(ConditionFailed):
        await log.append([opt_out(uuid4(), 1)], condition=condition)
    ok = AppendCondition(after=2, event_types=frozenset({"AccessRevoked"}), violated=violated)
    assert (await log.append([opt_out(uuid4(), 1)], condition=ok)).receipts[0].position == 3
