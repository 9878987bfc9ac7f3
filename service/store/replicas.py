"""Reads from streaming replicas, with read-your-writes.

Projections, tiles and proofs are read through a ``ReadRouter``: from a
healthy replica whose ledger head has reached what the read needs, else from
the primary. A replica is *healthy* while it answers and trails the primary
by at most ``max_lag`` entries; one that dies or falls behind leaves the
rotation and returns by itself once it has caught up (checked every
``interval`` seconds). A read that names a position (``Ledger-Min-Position``,
``min_position``) waits up to ``wait`` seconds for a replica to replay that
far, then reads from the primary: it is never answered from an older state.

Writes, projections that write, the checkpoint signer and recorded reads
never come here: they use the primary's pool."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

log = structlog.get_logger("consent_ledger.replicas")

CHECK_SECONDS = 1.0  # a replica that does not answer a health check within this is out


@dataclass
class Replica:
    name: str  # host:port/database, never the password
    pool: asyncpg.Pool
    head: int = 0
    healthy: bool = False
    lag: int | None = None
    problem: str | None = "not checked yet"


class _Reads:
    """``fetch``/``fetchrow``/``fetchval`` over ``acquire()``, as on an asyncpg pool."""

    def acquire(self) -> Any:
        raise NotImplementedError

    async def fetch(self, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetch(*args)

    async def fetchrow(self, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(*args)

    async def fetchval(self, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(*args)


_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError, asyncpg.InterfaceError)


class ReadRouter(_Reads):
    """Pool-like: ``acquire()`` and ``fetch``/``fetchrow``/``fetchval`` read from where they may."""

    def __init__(self, primary: asyncpg.Pool, replicas: list[Replica], *, wait: float = 2.0,
                 max_lag: int = 10_000, interval: float = 0.5):
        self.primary, self.replicas, self.wait, self.max_lag, self.interval = (
            primary, replicas, wait, max_lag, interval)
        self._turn = itertools.count()
        self.primary_head = 0
        self.served = {"primary": 0, **{r.name: 0 for r in replicas}}

    def at_least(self, position: int) -> _AtLeast:
        """The same router for reads that must reflect the ledger up to ``position``."""
        return _AtLeast(self, position)

    @asynccontextmanager
    async def acquire(self, min_position: int = 0) -> AsyncIterator[asyncpg.Connection]:
        replica = await self._pick(min_position)
        conn = None
        if replica is not None:
            try:
                conn = await replica.pool.acquire(timeout=CHECK_SECONDS)
            except (*_LOST, asyncio.TimeoutError) as exc:
                self._out(replica, f"{type(exc).__name__}: {exc}"[:200])
        if conn is None:
            async with self.primary.acquire() as primary:
                self.served["primary"] += 1
                yield primary
            return
        assert replica is not None
        self.served[replica.name] += 1
        try:
            yield conn
        except _LOST as exc:  # the replica went away mid-read: out of rotation; this read fails (503, retry)
            self._out(replica, f"{type(exc).__name__}: {exc}"[:200])
            raise
        finally:
            await replica.pool.release(conn)

    async def _pick(self, min_position: int) -> Replica | None:
        if not self.replicas:
            return None
        deadline = time.monotonic() + (self.wait if min_position else 0)
        while True:
            ready = [r for r in self.replicas if r.healthy and r.head >= min_position]
            if ready:
                return ready[next(self._turn) % len(ready)]
            if not any(r.healthy for r in self.replicas) or time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.02)
            await self._refresh([r for r in self.replicas if r.healthy])

    def _out(self, replica: Replica, problem: str) -> None:
        if replica.healthy:
            log.warning("replica out of rotation", replica=replica.name, problem=problem)
        replica.healthy, replica.problem = False, problem

    async def _refresh(self, replicas: list[Replica]) -> None:
        async def check(replica: Replica) -> None:
            try:
                async with asyncio.timeout(CHECK_SECONDS):
                    replica.head = await replica.pool.fetchval("SELECT position FROM ledger_head")
            except Exception as exc:  # noqa: BLE001 - any failure takes it out; the next check may bring it back
                self._out(replica, f"{type(exc).__name__}: {exc}"[:200])
                return
            replica.lag = max(0, self.primary_head - replica.head)
            if replica.lag > self.max_lag:
                self._out(replica, f"{replica.lag} entries behind the primary")
            elif not replica.healthy:
                log.info("replica back in rotation", replica=replica.name, lag=replica.lag)
                replica.healthy, replica.problem = True, None

        await asyncio.gather(*(check(r) for r in replicas))

    async def check(self) -> None:
        """Compare every replica's ledger head with the primary's; take out or bring back."""
        self.primary_head = await self.primary.fetchval("SELECT position FROM ledger_head")
        await self._refresh(self.replicas)

    async def run(self, beat: Callable[[], None]) -> None:
        """Check every interval (under the supervisor)."""
        while True:
            await self.check()
            beat()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        await asyncio.gather(*(r.pool.close() for r in self.replicas), return_exceptions=True)


class _AtLeast(_Reads):
    def __init__(self, router: ReadRouter, position: int):
        self.router, self.position = router, position

    def acquire(self) -> Any:
        return self.router.acquire(self.position)


def replica_name(url: str) -> str:
    """host:port/database of a replica's URL: what logs and metrics show (never the password)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'socket'}:{parts.port or 5432}{parts.path or ''}"
