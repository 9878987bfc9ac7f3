"""A real PostgreSQL primary and a real streaming replica of it, for tests
that must show where reads go and what happens when the replica lags, stops
or comes back.

    from replication import streaming_pair  # a module-scoped fixture

    async def test_reads_go_to_the_replica(streaming_pair):
        await streaming_pair.create_database("ledger")          # migrated, replayed on the replica
        url = streaming_pair.replica.database_url("ledger")    # ... and .primary.database_url("ledger")
        mark = streaming_pair.mark()
        ...                                                    # run the service against both
        reads = streaming_pair.statements(streaming_pair.replica, since=mark, database="ledger")
        assert any("ledger_events" in s.text for s in reads)

Both servers log every statement (``log_statement = all``) with its
database, application name and user, so a test counts exactly which server
ran what; ``pause_replay``/``resume_replay`` make the replica lag on demand,
``replica.stop()``/``replica.start()`` take it away and bring it back (its
replication slot keeps the WAL it misses), and ``wait_for_replay`` waits
until it has caught up with the primary.

The binaries are pgserver's; where they lack ``pg_basebackup``, the system's
PostgreSQL 15; where neither is complete the tests that use the fixture are
skipped, saying so."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from private_postgres import PGSERVER_BIN, PrivateCluster
from service.store.migrations import migrate

SYSTEM_BIN = Path("/usr/lib/postgresql/15/bin")
TOOLS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")

# Every statement, one parseable line each.  %q ends the prefix for lines not
# from a client session (checkpointer, startup process...), which carry no database.
SETTINGS = {
    "log_statement": "all",
    "log_line_prefix": "%m|%p|%q%d|%a|%u|",
    # Parameters would be NHS numbers: never in logs, even a test's.
    "log_parameter_max_length": "0",
    "log_parameter_max_length_on_error": "0",
    "hot_standby_feedback": "on",
}
_ENTRY = re.compile(r"^[^|]+\|\d+\|(?:(?P<database>[^|]*)\|(?P<application>[^|]*)\|(?P<user>[^|]*)\|)?"
                    r"(?P<level>[A-Z0-9]+):  (?P<message>.*)$")
_STATEMENT = re.compile(r"^(?:statement|execute [^:]*): (?P<text>.*)$", re.S)


def binaries() -> Path:
    """A PostgreSQL installation with everything a primary and a replica need."""
    for bin_dir in (PGSERVER_BIN, SYSTEM_BIN):
        if all((bin_dir / tool).exists() for tool in TOOLS):
            return bin_dir
    pytest.skip(f"no PostgreSQL installation with {', '.join(TOOLS)}: looked in {PGSERVER_BIN} and {SYSTEM_BIN}; "
                "the primary + streaming replica tests cannot run here")


def lsn(text: str) -> int:
    """A WAL location ``X/Y`` as a byte offset."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class Statement:
    database: str
    application: str
    user: str
    text: str


@dataclass(frozen=True)
class Mark:
    """Where each server's log ended at one moment."""
    offsets: dict[Path, int]


class StreamingPair:
    """A primary and its hot standby, both running on loopback."""

    def __init__(self) -> None:
        bin_dir = binaries()
        self.primary = PrivateCluster(bin_dir=bin_dir, settings=SETTINGS)
        try:
            self.primary.start()
            self.replica = PrivateCluster(bin_dir=bin_dir, replica_of=self.primary, slot="replica")
            self.replica.start()
        except BaseException:
            self.primary.remove()
            raise

    def remove(self) -> None:
        self.replica.remove()
        self.primary.remove()

    async def fetchval(self, server: PrivateCluster, sql: str, database: str = "postgres") -> Any:
        """One statement on ``server`` (``primary`` or ``replica``), as the superuser."""
        conn = await asyncpg.connect(server.database_url(database))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def create_database(self, name: str, *, migrated: bool = True) -> None:
        """A new database on the primary (with the ledger schema unless told
        otherwise), returning once the replica has replayed it."""
        await self.fetchval(self.primary, f'CREATE DATABASE "{name}"')
        if migrated:
            conn = await asyncpg.connect(self.primary.database_url(name))
            try:
                await migrate(conn)
            finally:
                await conn.close()
        await self.wait_for_replay()

    async def primary_lsn(self) -> int:
        """The end of the primary's WAL: what the replica has to replay."""
        return lsn(await self.fetchval(self.primary, "SELECT pg_current_wal_lsn()::text"))

    async def replay_lsn(self) -> int:
        """How far the replica has replayed (what its queries see)."""
        return lsn(await self.fetchval(self.replica, "SELECT pg_last_wal_replay_lsn()::text"))

    async def lag_bytes(self) -> int:
        """WAL the replica has not replayed yet (0 when it has caught up)."""
        primary = await self.primary_lsn()
        return max(0, primary - await self.replay_lsn())

    async def wait_for_replay(self, target: int | None = None, *, seconds: float = 15.0) -> int:
        """Wait until the replica has replayed ``target`` (default: the
        primary's WAL end now); its replay position.  Fails after ``seconds``."""
        target = await self.primary_lsn() if target is None else target
        deadline = time.monotonic() + seconds
        while True:
            try:
                replayed = await self.replay_lsn()
            except (OSError, asyncpg.CannotConnectNowError):
                replayed = 0  # still starting
            if replayed >= target:
                return replayed
            if time.monotonic() > deadline:
                raise AssertionError(f"the replica replayed {replayed:X} of {target:X} in {seconds} s")
            await asyncio.sleep(0.02)

    async def pause_replay(self) -> None:
        """Keep the replica up and answering, but showing a frozen past: it
        receives WAL and does not apply it until ``resume_replay``."""
        await self.fetchval(self.replica, "SELECT pg_wal_replay_pause()")

    async def resume_replay(self) -> None:
        await self.fetchval(self.replica, "SELECT pg_wal_replay_resume()")

    def mark(self) -> Mark:
        return Mark({s.log: s.log.stat().st_size if s.log.exists() else 0 for s in (self.primary, self.replica)})

    def statements(self, server: PrivateCluster, *, since: Mark | None = None,
                   database: str | None = None) -> list[Statement]:
        """Every statement ``server`` ran (since ``since``, in ``database``).
        A backend writes the line before it runs the statement, so a
        statement whose result the caller has seen is always there."""
        with server.log.open("rb") as f:
            f.seek(since.offsets[server.log] if since else 0)
            text = f.read().decode(errors="replace")
        entries: list[dict[str, str]] = []
        for line in text.splitlines():
            if line.startswith("\t") and entries:  # a multi-line statement continues
                entries[-1]["message"] += "\n" + line[1:]
            elif m := _ENTRY.match(line):
                entries.append(m.groupdict(default=""))
        found = []
        for e in entries:
            statement = _STATEMENT.match(e["message"]) if e["level"] == "LOG" and e["database"] else None
            if statement and (database is None or e["database"] == database):
                found.append(Statement(e["database"], e["application"], e["user"], statement["text"]))
        return found


@pytest.fixture(scope="module")
def streaming_pair() -> Iterator[StreamingPair]:
    pair = StreamingPair()
    try:
        yield pair
    finally:
        pair.remove()
