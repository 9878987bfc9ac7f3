"""Pooled connections are released without asyncpg's reset query; what the
service relies on must still hold after a release: the next user gets no
open transaction and still acts as the service role."""

from __future__ import annotations

import asyncpg

from service.store.database import Database


async def test_release_rolls_back_and_keeps_the_service_role(database: Database):
    pool = await database.create_pool(min_size=1, max_size=1)
    try:
        conn = await pool.acquire()
        first_pid = conn.get_server_pid()
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE leftover (x int)")
        await pool.release(conn)  # released mid-transaction, as a crashed handler would

        async with pool.acquire() as again:
            assert again.get_server_pid() == first_pid  # the same session, reused
            assert not again.is_in_transaction()
            assert await again.fetchval("SELECT current_user") == "consent_ledger_app"
            # The abandoned transaction's work was rolled back, not committed.
            assert await again.fetchval("SELECT to_regclass('pg_temp.leftover')") is None
    finally:
        await pool.close()


async def test_ledger_tables_stay_read_only_for_a_reused_connection(database: Database):
    pool = await database.create_pool(min_size=1, max_size=1)
    try:
        for _ in range(2):
            async with pool.acquire() as conn:
                try:
                    await conn.execute("DELETE FROM ledger_events")
                except asyncpg.PostgresError as exc:
                    refused = exc
                else:
                    refused = None
                assert isinstance(refused, (asyncpg.InsufficientPrivilegeError, asyncpg.RaiseError))
    finally:
        await pool.close()
