"""Stored cohorts: content-addressed member lists and which organisations
hold each (stored it, or recorded a use of it). The one home of cohort SQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from contracts import cohort as cohorts


def stored_with(cohort: cohorts.EncodedCohort, organisation: str) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """The side write that stores ``cohort`` for ``organisation`` in the
    transaction of the entry that records it."""

    async def write(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO cohorts (cohort_id, size, encoding, members) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (cohort_id) DO NOTHING",
            bytes.fromhex(cohort.cohort_id), len(cohort.stems), cohort.encoding, cohort.members,
        )
        await conn.execute(
            "INSERT INTO cohort_holders (cohort_id, organisation_code) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            bytes.fromhex(cohort.cohort_id), organisation,
        )

    return write


async def members(pool: asyncpg.Pool, cohort_id: str, holder: str | None = None) -> tuple[str, bytes] | None:
    """The cohort's (encoding, members); with ``holder``, only if that
    organisation holds it (anyone else is told it does not exist)."""
    async with pool.acquire() as conn:
        if holder is None:
            row = await conn.fetchrow("SELECT encoding, members FROM cohorts WHERE cohort_id = $1",
                                      bytes.fromhex(cohort_id))
        else:
            row = await conn.fetchrow(
                "SELECT c.encoding, c.members FROM cohorts c JOIN cohort_holders h USING (cohort_id)"
                " WHERE c.cohort_id = $1 AND h.organisation_code = $2", bytes.fromhex(cohort_id), holder)
    return (row["encoding"], bytes(row["members"])) if row is not None else None


async def held_by(pool: asyncpg.Pool, cohort_id: str, organisation: str) -> bool:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM cohort_holders WHERE cohort_id = $1"
                                   " AND organisation_code = $2)", bytes.fromhex(cohort_id), organisation)


async def store_removed(pool: asyncpg.Pool, call_id: str, encoding: str, members: bytes) -> None:
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO removed_sets (call_id, encoding, members) VALUES ($1, $2, $3)",
                           call_id, encoding, members)


async def removed(pool: asyncpg.Pool, call_id: str) -> tuple[str, bytes] | None:
    """The (encoding, members) of the patients filter call ``call_id`` removed."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT encoding, members FROM removed_sets WHERE call_id = $1", call_id)
    return (row["encoding"], bytes(row["members"])) if row is not None else None
