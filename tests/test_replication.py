"""The primary + streaming replica harness (tests/replication.py) does what
the read-replica tests rely on: the replica really is a hot standby of the
primary, it replays what the primary writes (the ledger schema and its roles
included), a stopped replica comes back and catches up, paused replay makes
it lag on demand, and statements are counted per server."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from replication import StreamingPair, streaming_pair  # noqa: F401  (the fixture)
from service.store.migrations import APP_ROLE


@pytest.fixture
async def db(streaming_pair: StreamingPair) -> str:
    name = f"repl_{uuid.uuid4().hex[:8]}"
    await streaming_pair.create_database(name)
    return name


async def test_the_replica_is_a_read_only_standby_with_the_ledger_schema(streaming_pair: StreamingPair, db: str):
    pair = streaming_pair
    assert await pair.fetchval(pair.primary, "SELECT pg_is_in_recovery()") is False
    assert await pair.fetchval(pair.replica, "SELECT pg_is_in_recovery()") is True
    # Migrated on the primary, present on the replica, readable there by the service role.
    replica = await asyncpg.connect(pair.replica.database_url(db), server_settings={"role": APP_ROLE})
    try:
        assert await replica.fetchval("SELECT position FROM ledger_head") == 0
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await replica.execute("CREATE TABLE nope (x int)")
    finally:
        await replica.close()


async def test_a_write_on_the_primary_is_replayed_on_the_replica(streaming_pair: StreamingPair, db: str):
    pair = streaming_pair
    await pair.fetchval(pair.primary, "CREATE TABLE t AS SELECT x FROM (VALUES (1), (2), (3)) v (x)", db)
    await pair.wait_for_replay()
    assert await pair.lag_bytes() == 0
    assert await pair.fetchval(pair.replica, "SELECT sum(x) FROM t", db) == 6


async def test_a_stopped_replica_restarts_and_catches_up(streaming_pair: StreamingPair, db: str):
    pair = streaming_pair
    pair.replica.stop()
    try:
        with pytest.raises(OSError):
            await pair.fetchval(pair.replica, "SELECT 1", db)
        # Enough WAL to span several segments...
        await pair.fetchval(pair.primary, "CREATE TABLE missed AS SELECT g AS x, repeat('w', 500) AS pad"
                                          " FROM generate_series(1, 60000) g", db)
        # ...which a checkpoint would remove if the replica's slot did not keep them.
        await pair.fetchval(pair.primary, "CHECKPOINT")
        assert await pair.fetchval(pair.primary, "SELECT NOT active AND pg_current_wal_lsn() - restart_lsn > 30000000"
                                                 " FROM pg_replication_slots WHERE slot_name = 'replica'")
    finally:
        pair.replica.start()
    await pair.wait_for_replay()
    assert await pair.fetchval(pair.replica, "SELECT count(*) FROM missed", db) == 60000


async def test_paused_replay_makes_the_replica_lag_until_resumed(streaming_pair: StreamingPair, db: str):
    pair = streaming_pair
    await pair.fetchval(pair.primary, "CREATE TABLE r (x int)", db)
    await pair.wait_for_replay()
    await pair.pause_replay()
    try:
        await pair.fetchval(pair.primary, "INSERT INTO r VALUES (42)", db)
        assert await pair.lag_bytes() > 0
        assert await pair.fetchval(pair.replica, "SELECT count(*) FROM r", db) == 0
    finally:
        await pair.resume_replay()
    await pair.wait_for_replay()
    assert await pair.fetchval(pair.replica, "SELECT x FROM r", db) == 42


async def test_statements_are_counted_on_the_server_that_ran_them(streaming_pair: StreamingPair, db: str):
    pair = streaming_pair
    mark = pair.mark()
    tag = uuid.uuid4().hex
    replica = await asyncpg.connect(pair.replica.database_url(db), server_settings={"application_name": "harness-test"})
    try:
        # A prepared (extended protocol) statement, as the service's pool sends them.
        assert await replica.fetchval(f"SELECT '{tag}'::text AS tag, $1::int", 7) == tag
        await replica.execute(f"SELECT 'simple {tag}'")  # and a simple-protocol one
    finally:
        await replica.close()
    on_replica = [s for s in pair.statements(pair.replica, since=mark, database=db) if tag in s.text]
    assert [(s.application, s.user) for s in on_replica] == [("harness-test", "postgres")] * 2
    assert on_replica[0].text.startswith(f"SELECT '{tag}'::text AS tag, $1::int")
    assert not [s for s in pair.statements(pair.primary, since=mark) if tag in s.text]
    # Counting from a later mark leaves them out; another database's filter too.
    assert not [s for s in pair.statements(pair.replica, since=pair.mark()) if tag in s.text]
    assert not [s for s in pair.statements(pair.replica, since=mark, database="postgres") if tag in s.text]
