"""The projection runner: catch up from each projection's tracked position,
then follow the ledger live.

Reading the log: the runner reads ``ledger_events`` itself (SELECT only, in
position order) and decodes each ``entry`` with ``contracts.entry``.  That
keeps ``projections`` independent of ``service`` while reading exactly the
bytes the hash chain covers; positions are gap-free and commit-ordered, so
"everything after N" never misses a late commit.

Exactly once: a projection applies a batch and moves its row in
``projection_positions`` in ONE transaction, after locking that row.  A crash
or an exception anywhere before commit rolls both back; a second process
running the same projection waits on the row lock and then skips what the
first applied.

Live: LISTEN on ``consent_ledger`` (the writer NOTIFYs the head position
after each batch) wakes the loop at once; a poll every ``poll_interval``
seconds means a lost notification, or a dropped listening connection, only
delays.

Followers are in-memory consumers (the opt-out filter) fed the same decoded
entries; they keep their own position and are not transactional.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import structlog

from contracts.entry import Entry, decode_entry

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "consent_ledger"


async def read_entries(conn: asyncpg.Connection, after: int, limit: int) -> list[Entry]:
    rows = await conn.fetch(
        "SELECT entry FROM ledger_events WHERE position > $1 ORDER BY position LIMIT $2", after, limit
    )
    return [decode_entry(r["entry"]) for r in rows]


async def ledger_head(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT position FROM ledger_head")


class Projection(ABC):
    """A read model kept in tables.  ``suffix`` names a shadow copy (rebuild)."""

    name: str
    tables: tuple[str, ...]

    def __init__(self, suffix: str = ""):
        self.suffix = suffix

    @property
    def position_name(self) -> str:
        return self.name + self.suffix

    def t(self, table: str) -> str:
        assert table in self.tables, table
        return table + self.suffix

    @abstractmethod
    async def apply(self, conn: asyncpg.Connection, entries: Sequence[Entry]) -> None:
        """Write the effect of ``entries`` (all after the tracked position) in ``conn``'s transaction."""

    async def position(self, conn: asyncpg.Connection) -> int:
        value = await conn.fetchval(
            "SELECT position FROM projection_positions WHERE name = $1", self.position_name
        )
        return value or 0

    async def advance(self, conn: asyncpg.Connection, entries: Sequence[Entry]) -> int:
        """Apply the entries this projection has not applied yet; return its new position.

        Must run inside a transaction: view rows and position commit together."""
        await conn.execute(
            "INSERT INTO projection_positions (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
            self.position_name,
        )
        current = await conn.fetchval(
            "SELECT position FROM projection_positions WHERE name = $1 FOR UPDATE", self.position_name
        )
        fresh = [e for e in entries if e.position > current]
        if not fresh:
            return current
        if fresh[0].position != current + 1:
            raise RuntimeError(f"{self.position_name}: gap after {current} (got {fresh[0].position})")
        await self.apply(conn, fresh)
        await conn.execute(
            "UPDATE projection_positions SET position = $2 WHERE name = $1", self.position_name, fresh[-1].position
        )
        return fresh[-1].position


class Follower(ABC):
    """An in-memory consumer of the ledger."""

    position: int

    @abstractmethod
    def follow(self, entries: Sequence[Entry]) -> None:
        """Apply entries after ``self.position`` and move it."""


class Runner:
    def __init__(
        self,
        pool: asyncpg.Pool,
        projections: Sequence[Projection],
        *,
        followers: Sequence[Follower] = (),
        listen: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
        batch_size: int = 5000,
        poll_interval: float = 1.0,
        leading: Callable[[], bool] = lambda: True,
        read_pool: Any = None,
    ):
        """``leading``: whether this process writes the projections now (the writer lease); while it
        does not, it only feeds its followers, reading entries from ``read_pool`` (a replica router)."""
        self.pool = pool
        self.leading = leading
        self.read_pool = read_pool or pool
        self._led = False
        self.projections = list(projections)
        self.followers = list(followers)
        self._listen_factory = listen
        self._listen_conn: asyncpg.Connection | None = None
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.positions: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._advanced = asyncio.Condition()

    # --- lifecycle --------------------------------------------------------------

    async def prepare(self) -> None:
        """Load each projection's tracked position and start listening."""
        async with self.pool.acquire() as conn:
            for p in self.projections:
                self.positions[p.name] = await p.position(conn)
        await self._ensure_listening()

    async def close(self) -> None:
        """Stop listening (after the loop in ``run`` has been cancelled)."""
        if self._listen_conn is not None:
            conn, self._listen_conn = self._listen_conn, None
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    async def _ensure_listening(self) -> None:
        if self._listen_factory is None:
            return
        if self._listen_conn is not None and not self._listen_conn.is_closed():
            return
        try:
            conn = await self._listen_factory()
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("projection LISTEN unavailable; polling", error=type(exc).__name__)
            return
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        self._listen_conn = conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    # --- the loop ---------------------------------------------------------------

    async def run(self, beat: Callable[[], None] = lambda: None) -> None:
        """Follow the ledger until cancelled; ``beat()`` after every batch
        applied and every look that found nothing new (a long catch-up is
        progress too).  A failed step (rolled back) ends this call: run it
        under a supervisor, which logs the failure and runs it again."""
        while True:
            await self._ensure_listening()
            while await self.step():
                beat()
            beat()
            self._wake.clear()
            # asyncio.timeout rather than wait_for: on Python 3.11 wait_for can
            # lose a cancellation that races with the event (stopping then hangs).
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def lowest_position(self) -> int:
        """The position every projection (while leading) and follower has reached."""
        marks = [self.positions.get(p.name, 0) for p in self.projections] if self._led else []
        marks += [f.position for f in self.followers]
        return min(marks) if marks else 0

    async def step(self) -> bool:
        """Process one batch; True if anything was read."""
        leading = self.leading() and bool(self.projections)
        if leading and not self._led:  # taking over: where the last writer left the projections
            async with self.pool.acquire() as conn:
                for p in self.projections:
                    self.positions[p.name] = await p.position(conn)
        self._led = leading
        if not leading:
            return await self._follow()
        if not self.projections and not self.followers:
            return False  # nothing would ever move past what it reads
        async with self.pool.acquire() as conn:
            entries = await read_entries(conn, self.lowest_position(), self.batch_size)
            if not entries:
                return False
            # Followers first: the in-memory filter keeps answering even if a
            # view's transaction keeps failing.
            await self._feed(entries)
            for p in self.projections:
                if self.positions.get(p.name, 0) >= entries[-1].position:
                    continue
                async with conn.transaction():
                    new = await p.advance(conn, entries)
                self.positions[p.name] = new
        async with self._advanced:
            self._advanced.notify_all()
        return True

    async def _follow(self) -> bool:
        """Feed the followers only (another process writes the projections)."""
        if not self.followers:
            return False
        async with self.read_pool.acquire() as conn:
            entries = await read_entries(conn, self.lowest_position(), self.batch_size)
        if not entries:
            return False
        await self._feed(entries)
        return True

    async def _feed(self, entries: Sequence[Entry]) -> None:
        for f in self.followers:
            if f.position < entries[-1].position:
                f.follow([e for e in entries if e.position > f.position])
        async with self._advanced:
            self._advanced.notify_all()

    async def catch_up(self, until: int | None = None) -> None:
        """Run batches until every consumer has reached ``until`` (default: the head now)."""
        if until is None:
            async with self.pool.acquire() as conn:
                until = await ledger_head(conn)
        while self.lowest_position() < until:
            if not await self.step():
                break

    async def wait_for(self, position: int, timeout: float, reached: Callable[[], int]) -> bool:
        """Wait until ``reached()`` >= position, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        async with self._advanced:
            while reached() < position:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    async with asyncio.timeout(min(left, self.poll_interval)):
                        await self._advanced.wait()
                except TimeoutError:
                    self._wake.set()
        return True
