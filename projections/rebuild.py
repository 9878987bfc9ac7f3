"""Status and rebuild of projections.

A rebuild replays the ledger from position 0 into shadow tables
(``<table>__rebuild``) while the live tables keep serving and the live
runner keeps advancing them.  Then one short transaction locks the live
projection's position row (so no runner in any process can apply to it),
brings the shadow up to the head, and copies it over the live tables with
the shadow's position.  Readers see the old view until that commit and the
new one after it; table identities (and so grants and prepared statements)
are kept.  Needs the schema owner (CREATE TABLE, TRUNCATE).
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from .choices import ChoicesProjection
from .runner import Projection, ledger_head, read_entries
from .uses import UsesProjection

PROJECTIONS: dict[str, Callable[..., Projection]] = {
    ChoicesProjection.name: ChoicesProjection,
    UsesProjection.name: UsesProjection,
}
SHADOW = "__rebuild"


async def status(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
    """(name, position, lag behind the head) for every projection."""
    head = await ledger_head(conn)
    out = []
    for name, cls in PROJECTIONS.items():
        position = await cls().position(conn)
        out.append((name, position, head - position))
    return out


async def _catch_up(conn: asyncpg.Connection, projection: Projection, until: int, batch: int,
                    progress: Callable[[int, int], None] | None = None) -> int:
    position = await projection.position(conn)
    while position < until:
        entries = await read_entries(conn, position, min(batch, until - position))
        if not entries:
            break
        async with conn.transaction():
            position = await projection.advance(conn, entries)
        if progress is not None:
            progress(position, until)
    return position


async def rebuild(
    conn: asyncpg.Connection, name: str, *, batch: int = 5000, progress: Callable[[int, int], None] | None = None
) -> int:
    """Rebuild projection ``name`` from position 0; return the position it reflects."""
    cls = PROJECTIONS[name]
    live, shadow = cls(), cls(suffix=SHADOW)
    for table in cls.tables:
        await conn.execute(f"DROP TABLE IF EXISTS {table}{SHADOW}")
        await conn.execute(f"CREATE TABLE {table}{SHADOW} (LIKE {table} INCLUDING ALL)")
    await conn.execute("DELETE FROM projection_positions WHERE name = $1", shadow.position_name)
    while True:
        head = await ledger_head(conn)
        reached = await _catch_up(conn, shadow, head, batch, progress)
        if head - reached < batch:
            break
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO projection_positions (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
            live.position_name,
        )
        await conn.execute("SELECT 1 FROM projection_positions WHERE name = $1 FOR UPDATE", live.position_name)
        head = await ledger_head(conn)
        position = await _catch_up(conn, shadow, head, batch)
        for table in cls.tables:
            await conn.execute(f"TRUNCATE {table}")
            await conn.execute(f"INSERT INTO {table} SELECT * FROM {table}{SHADOW}")
            await conn.execute(f"DROP TABLE {table}{SHADOW}")
        await conn.execute(
            "UPDATE projection_positions SET position = $2 WHERE name = $1", live.position_name, position
        )
        await conn.execute("DELETE FROM projection_positions WHERE name = $1", shadow.position_name)
    return position
