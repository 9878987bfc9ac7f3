"""The event store against a real PostgreSQL: positions, hash chain,
optimistic concurrency, idempotency, append conditions, append-only."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import asyncpg
import pytest

from contracts.entry import GENESIS_CHAIN_HASH, chain_hash, decode_entry, leaf_hash
from contracts.events import OptOutRegistered
from contracts.values import Actor
from service.audit.chain import verify_database
from service.store.database import Database
from service.store.event_log import IdempotencyKey, NewEvent, StoreBusy, StoreUnavailable
from service.store.event_store import EventStore


def opt_out(aggregate_id, version: int, nhs: str = "9434765919") -> NewEvent:
    return NewEvent(
        event_id=uuid4(),
        event_type="OptOutRegistered",
        aggregate_id=aggregate_id,
        aggregate_version=version,
        payload=OptOutRegistered(
            nhs_number=nhs, scope="national", channel="app", actor=Actor(kind="patient"), recorded_by="test"
        ),
    )


async def test_positions_and_chain_link_from_genesis(store: EventStore, pool: asyncpg.Pool):
    agg = uuid4()
    receipts = [(await store.append([opt_out(agg, v)])).receipts[0] for v in (1, 2, 3)]
    assert [r.position for r in receipts] == [1, 2, 3]
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT position, entry, leaf_hash, chain_hash FROM ledger_events ORDER BY position")
        verified = await verify_database(conn)
    previous = GENESIS_CHAIN_HASH
    for row, receipt in zip(rows, receipts):
        leaf = leaf_hash(bytes(row["entry"]))
        previous = chain_hash(previous, leaf)
        assert receipt.leaf_hash == leaf.hex() == bytes(row["leaf_hash"]).hex()
        assert receipt.chain_hash == previous.hex()
        assert decode_entry(bytes(row["entry"])).position == row["position"]
    assert verified.failure is None and verified.size == 3


async def test_full_queue_answers_busy_instead_of_growing(pool: asyncpg.Pool):
    small = EventStore(pool, queue_size=1, max_batch=1)
    small.start()
    try:
        results = await asyncio.gather(*(small.append([opt_out(uuid4(), 1)]) for _ in range(50)),
                                       return_exceptions=True)
    finally:
        await small.stop()
    busy = [r for r in results if isinstance(r, StoreBusy)]
    written = [r for r in results if not isinstance(r, Exception)]
    assert busy and written
    assert sorted(r.receipts[0].position for r in written) == list(range(1, len(written) + 1))


@pytest.mark.parametrize("statement", [
    "UPDATE ledger_events SET event_type = 'x'",
    "DELETE FROM ledger_events",
    "TRUNCATE ledger_events",
    "UPDATE ledger_idempotency SET key = 'x'",
    "DELETE FROM ledger_idempotency",
    "TRUNCATE cohorts",
    "DELETE FROM ledger_head",
    "UPDATE ledger_head SET position = 0",
    "CREATE TABLE sneaky (x int)",
])
async def test_service_role_cannot_rewrite_the_ledger(store: EventStore, pool: asyncpg.Pool, statement: str):
    await store.append([opt_out(uuid4(), 1)], idempotency=IdempotencyKey("c", "k", b"h"))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_user") == "consent_ledger_app"
        with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.RaiseError)):
            await conn.execute(statement)
        assert await conn.fetchval("SELECT count(*) FROM ledger_events") == 1


@pytest.mark.parametrize("statement", [
    "UPDATE ledger_events SET event_type = 'x'",
    "DELETE FROM ledger_events",
    "TRUNCATE ledger_events",
    "UPDATE ledger_head SET position = 0",
])
async def test_even_the_owner_is_refused_by_the_trigger(store: EventStore, database, statement: str):
    await store.append([opt_out(uuid4(), 1)])
    conn = await database.connect_owner()
    try:
        with pytest.raises(asyncpg.PostgresError, match="append-only|may not move back"):
            await conn.execute(statement)
        assert await conn.fetchval("SELECT count(*) FROM ledger_events") == 1
    finally:
        await conn.close()


async def test_stop_writes_everything_already_queued(pool: asyncpg.Pool):
    s = EventStore(pool, queue_size=1000, max_batch=10)
    s.start()
    pending = [asyncio.create_task(s.append([opt_out(uuid4(), 1)])) for _ in range(100)]
    await asyncio.sleep(0)  # let every task queue its append
    await s.stop()
    results = await asyncio.gather(*pending)
    assert sorted(r.receipts[0].position for r in results) == list(range(1, 101))
    with pytest.raises(StoreUnavailable):
        await s.append([opt_out(uuid4(), 1)])


# --- least privilege: what the service role holds, independent of the triggers ----------------

_LEDGER_TABLES = ("ledger_events", "ledger_idempotency", "cohorts", "ledger_head")


@pytest.mark.parametrize("table", _LEDGER_TABLES)
async def test_service_role_holds_no_rewriting_privilege(pool: asyncpg.Pool, table: str):
    """The privileges alone refuse rewriting: the triggers are a second wall, not the only one."""
    async with pool.acquire() as conn:
        held = {
            p for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
            if await conn.fetchval("SELECT has_table_privilege(current_user, $1, $2)", table, p)
        }
    assert held == ({"SELECT", "UPDATE"} if table == "ledger_head" else {"SELECT", "INSERT"})


@pytest.mark.parametrize("statement", [
    "CREATE TABLE public.sneaky (x int)",
    "CREATE SCHEMA sneaky",
    "CREATE FUNCTION public.sneaky() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE VIEW public.sneaky AS SELECT 1",
    "DROP TABLE ledger_events",
    "ALTER TABLE ledger_events DISABLE TRIGGER USER",
    "DROP TRIGGER ledger_events_append_only ON ledger_events",
    "ALTER TABLE ledger_events OWNER TO consent_ledger_app",
    "INSERT INTO schema_migrations (version) VALUES (999)",
])
async def test_service_role_cannot_change_the_schema(pool: asyncpg.Pool, statement: str):
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied|must be owner"):
            await conn.execute(statement)


async def test_service_role_owns_nothing(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        owned = await conn.fetchval("SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole")
    assert owned == 0


async def test_a_separate_service_login_cannot_become_the_owner(database, admin_dsn: str):
    """The production set-up in deploy/POSTGRES-ROLES.md: the service logs in
    as its own role, a member of consent_ledger_app, so RESET ROLE gains nothing."""
    from urllib.parse import urlsplit, urlunsplit

    login = f"cl_service_{uuid4().hex[:8]}"
    admin = await database.connect_owner()
    await admin.execute(f"CREATE ROLE {login} LOGIN PASSWORD 'test-only' NOINHERIT IN ROLE consent_ledger_app")
    parts = urlsplit(database.owner_dsn)
    netloc = f"{login}:test-only@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    service = Database(owner_dsn=database.owner_dsn, embedded=False,
                       service_dsn=urlunsplit(parts._replace(netloc=netloc)))
    try:
        pool = await service.create_pool(min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT current_user") == "consent_ledger_app"
                assert await conn.fetchval("SELECT session_user") == login
                # The startup `role` setting is only a default: drop to the login role itself.
                await conn.execute("SET ROLE NONE")
                assert await conn.fetchval("SELECT current_user") == login
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetch("SELECT * FROM ledger_events")  # NOINHERIT: nothing without the role
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(f"SET ROLE {urlsplit(admin_dsn).username or 'postgres'}")
                await conn.execute("RESET ROLE")  # back to the startup default for the store below
            store = EventStore(pool, queue_size=10, max_batch=10)
            store.start()
            try:
                assert (await store.append([opt_out(uuid4(), 1)])).receipts[0].position == 1
            finally:
                await store.stop()
        finally:
            await pool.close()
        # The projections' LISTEN connection logs in as the service too, never as the owner.
        listener = await service.connect_app()
        try:
            assert await listener.fetchval("SELECT session_user") == login
            assert await listener.fetchval("SELECT current_user") == "consent_ledger_app"
        finally:
            await listener.close()
        # Nobody logs in as the role itself (deploy/POSTGRES-ROLES.md): logins are members of it.
        assert await admin.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'consent_ledger_app'") is False
    finally:
        await admin.execute(f"DROP ROLE {login}")
        await admin.close()


async def test_a_plain_owner_without_createrole_can_migrate(admin_dsn: str):
    """deploy/POSTGRES-ROLES.md: the owner is not a superuser and cannot create roles."""
    from urllib.parse import urlsplit, urlunsplit

    from service.store.migrations import MIGRATIONS, migrate

    owner, name = f"cl_owner_{uuid4().hex[:8]}", f"cl_roles_{uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f"CREATE ROLE {owner} LOGIN PASSWORD 'test-only' NOSUPERUSER NOCREATEROLE NOCREATEDB")
    await admin.execute(f'CREATE DATABASE "{name}" OWNER {owner}')
    try:
        parts = urlsplit(admin_dsn)
        netloc = f"{owner}:test-only@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        conn = await asyncpg.connect(urlunsplit(parts._replace(netloc=netloc, path=f"/{name}")))
        try:
            assert await migrate(conn) == [v for v, _ in MIGRATIONS]
            assert await conn.fetchval("SELECT has_table_privilege('consent_ledger_app', 'ledger_events', 'INSERT')")
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f"DROP ROLE {owner}")
        await admin.close()


async def test_an_append_whose_caller_gave_up_before_its_batch_is_not_written(store: EventStore, database):
    """A request that timed out while its write was still queued was told the
    write may not have landed; it does not land later behind its back."""
    blocker = await database.connect_owner()
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT position FROM ledger_head FOR UPDATE")  # the writer waits on this
        first = asyncio.create_task(store.append([opt_out(uuid4(), 1)]))
        await asyncio.sleep(0.3)  # its batch has begun and waits for the head row
        abandoned = asyncio.create_task(store.append([opt_out(uuid4(), 1, nhs="4010232137")]))
        await asyncio.sleep(0.05)  # queued behind the first batch
        abandoned.cancel()
        await tx.rollback()
        assert (await first).receipts[0].position == 1
        after = await store.append([opt_out(uuid4(), 1)])
    finally:
        await blocker.close()
    assert after.receipts[0].position == 2, "the abandoned append was written"
    assert abandoned.cancelled()
