"""Exactly one process at a time does each single-writer job (applying the
projections, signing checkpoints, submitting to witnesses, making and
delivering notifications), however many `serve` processes run on however
many hosts.

A lease is a PostgreSQL session-level advisory lock held on a connection of
its own: when its holder dies or loses the database, PostgreSQL ends the
session and releases the lock, and another process's next try (every
``interval`` seconds) takes it over. Correctness never rests on the lease
alone — projections lock their position rows, the signer its own
transaction lock, the notifier moves cursors only forward — it keeps the
work from being done twice over."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

log = structlog.get_logger("consent_ledger.leases")

Work = Callable[[Callable[[], None]], Awaitable[None]]
# How often guarded work looks whether the lease is (still) held: soon after it changes hands.
STANDBY_LOOK = 0.05


def lock_key(name: str) -> int:
    """A stable 63-bit advisory lock key for a lease name."""
    return int.from_bytes(hashlib.sha256(f"consent-ledger/lease/{name}".encode()).digest()[:8], "big") >> 1


class Lease:
    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], name: str = "writer",
                 interval: float = 1.0):
        self.connect, self.name, self.interval, self.key = connect, name, interval, lock_key(name)
        self.held = False
        self._conn: asyncpg.Connection | None = None

    async def take(self) -> bool:
        """One try at once (at start, so that a lone process leads from its first moment)."""
        self._conn = self._conn or await self.connect()
        self.held = self.held or await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key)
        return self.held

    async def run(self, beat: Callable[[], None]) -> None:
        """Try for the lease, then keep checking that its session lives (under the supervisor: a lost
        connection ends this call, the lease with it, and the next run tries again)."""
        conn, self._conn = self._conn or await self.connect(), None
        try:
            while True:
                async with asyncio.timeout(max(self.interval, 1.0) * 2):
                    if not self.held:
                        self.held = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key)
                        if self.held:
                            log.info("lease taken: this process now does the single-writer work", lease=self.name)
                    else:
                        await conn.fetchval("SELECT 1")  # the session, and so the lock, is still ours
                beat()
                await asyncio.sleep(self.interval)
        finally:
            if self.held:  # stopping, or the session was lost: either way another process may take it now
                log.info("lease released", lease=self.name)
            self.held = False
            conn.terminate()

    def guard(self, work: Work) -> Work:
        """``work`` run only while this process holds the lease; stopped when it loses it."""
        async def guarded(beat: Callable[[], None]) -> None:
            while True:
                if not self.held:
                    beat()  # standing by is this task's progress
                    await asyncio.sleep(STANDBY_LOOK)
                    continue
                task = asyncio.create_task(work(beat))
                try:
                    while self.held and not task.done():
                        await asyncio.wait({task}, timeout=STANDBY_LOOK)
                finally:
                    if not task.done():
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                if task.done() and not task.cancelled():
                    task.result()  # the work failed (or returned): the supervisor logs and restarts it

        return guarded
