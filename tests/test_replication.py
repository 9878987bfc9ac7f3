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
from service.schema import APP_ROLE


async def _connect(pair: StreamingPair, which: str, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(getattr(pair, which).database_url(database))


@pytest.fixture
async def db(streaming_pair: StreamingPair) -> str:
    name = f"repl_{uuid.uuid4().hex[:8]}"
    await streaming_pair.create_database(name)
    return name


async def test_the_replica_is_a_read_only_standby_with_the_ledger_schema(streaming_pair: StreamingPair, db: str):
    primary, replica = await _connect(streaming_pair, "primary", db), await _connect(streaming_pair, "replica", db)
    try:
        assert await primary.fetchval("SELECT pg_is_in_recovery()") is False
        assert await replica.fetchval("SELECT pg_is_in_recovery()") is True
        # Migrated on the primary, present on the replica, readable there by the service role.
        await replica.execute(f"SET ROLE {APP_ROLE}")
        assert await replica.fetchval("SELECT position FROM ledger_head") == 0
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await replica.execute("CREATE TABLE nope (x int)")
    finally:
        await primary.close()
        await replica.close()


async def test_a_write_on_the_primary_is_replayed_on_the_replica(streaming_pair: StreamingPair, db: str):
    primary = await _connect(streaming_pair, "primary", db)
    try:
        await primary.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2), (3)")
    finally:
        await primary.close()
    await streaming_pair.wait_for_replay()
    assert await streaming_pair.lag_bytes() == 0
    replica = await _connect(streaming_pair, "replica", db)
    try:
        assert await replica.fetchval("SELECT sum(x) FROM t") == 6
    finally:
        await replica.close()


async def test_a_stopped_replica_restarts_and_catches_up(streaming_pair: StreamingPair, db: str):
    streaming_pair.replica.stop()
    try:
        with pytest.raises(OSError):
            await _connect(streaming_pair, "replica", db)
        primary = await _connect(streaming_pair, "primary", db)
        try:
            # Enough WAL to span several segments, all of which the slot must keep.
            await primary.execute("CREATE TABLE missed AS SELECT g AS x, repeat('w', 500) AS pad"
                                  " FROM generate_series(1, 60000) g")
            # A checkpoint removes the WAL no one needs: only the slot keeps what the replica missed.
            await primary.execute("CHECKPOINT")
            assert await primary.fetchval(
                "SELECT NOT active AND pg_current_wal_lsn() - restart_lsn > 30000000"
                " FROM pg_replication_slots WHERE slot_name = 'replica'")
        finally:
            await primary.close()
    finally:
        streaming_pair.replica.start()
    await streaming_pair.wait_for_replay()
    replica = await _connect(streaming_pair, "replica", db)
    try:
        assert await replica.fetchval("SELECT count(*) FROM missed") == 60000
    finally:
        await replica.close()


async def test_paused_replay_makes_the_replica_lag_until_resumed(streaming_pair: StreamingPair, db: str):
    primary = await _connect(streaming_pair, "primary", db)
    replica = await _connect(streaming_pair, "replica", db)
    try:
        await primary.execute("CREATE TABLE r (x int)")
        await streaming_pair.wait_for_replay()
        await streaming_pair.pause_replay()
        try:
            await primary.execute("INSERT INTO r VALUES (42)")
            assert await streaming_pair.lag_bytes() > 0
            assert await replica.fetchval("SELECT count(*) FROM r") == 0
        finally:
            await streaming_pair.resume_replay()
        await streaming_pair.wait_for_replay()
        assert await replica.fetchval("SELECT x FROM r") == 42
    finally:
        await primary.close()
        await replica.close()


async def test_statements_are_counted_on_the_server_that_ran_them(streaming_pair: StreamingPair, db: str):
    mark = streaming_pair.mark()
    tag = uuid.uuid4().hex
    replica = await asyncpg.connect(streaming_pair.replica.database_url(db),
                                    server_settings={"application_name": "harness-test"})
    try:
        # A prepared (extended protocol) statement, as the service's pool sends them.
        assert await replica.fetchval(f"SELECT '{tag}'::text AS tag, $1::int", 7) == tag
        await replica.execute(f"SELECT 'simple {tag}'")  # and a simple-protocol one
    finally:
        await replica.close()
    on_replica = [s for s in streaming_pair.statements(streaming_pair.replica, since=mark, database=db)
                  if tag in s.text]
    assert [(s.application, s.user) for s in on_replica] == [("harness-test", "postgres")] * 2
    assert on_replica[0].text.startswith(f"SELECT '{tag}'::text AS tag, $1::int")
    assert not [s for s in streaming_pair.statements(streaming_pair.primary, since=mark) if tag in s.text]
    # Counting from a later mark leaves them out; another database's filter too.
    assert not [s for s in streaming_pair.statements(streaming_pair.replica, since=streaming_pair.mark())
                if tag in s.text]
    assert not [s for s in streaming_pair.statements(streaming_pair.replica, since=mark, database="postgres")
                if tag in s.text]
