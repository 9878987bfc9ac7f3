"""The subscriptions and their outbox, in PostgreSQL.

A subscription's ``cursor`` is the ledger position its notifications have
been made up to; the notifier writes a batch of notifications and moves the
cursors in one transaction, so a crash never loses or repeats one. A
notification is delivered at least once; its ``webhook_id`` never changes,
so a receiver de-duplicates by it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class SubscriptionRow:
    id: str
    owner: str
    url: str
    events: tuple[str, ...]
    description: str
    secret: str
    status: str
    cursor: int
    created_at: datetime
    patients_count: int
    patients_version: int


def _row(r: asyncpg.Record) -> SubscriptionRow:
    return SubscriptionRow(r["id"], r["owner"], r["url"], tuple(r["events"]), r["description"], r["secret"],
                           r["status"], r["cursor"], r["created_at"], r["patients_count"], r["patients_version"])


_COLUMNS = ("id, owner, url, events, description, secret, status, cursor, created_at, patients_count,"
            " patients_version")


@dataclass(frozen=True)
class Pending:
    seq: int
    subscription_id: str
    webhook_id: str
    type: str
    position: int
    body: bytes
    attempts: int
    first_attempt_at: datetime | None
    url: str
    secret: str


@dataclass(frozen=True)
class Made:
    """A notification the notifier made for one subscription."""

    subscription_id: str
    webhook_id: str
    type: str
    position: int
    body: bytes


class Outbox:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def create(self, id: str, owner: str, url: str, events: list[str], description: str, secret: str,
                     cursor: int) -> SubscriptionRow:
        async with self.pool.acquire() as conn:
            r = await conn.fetchrow(
                f"INSERT INTO subscriptions (id, owner, url, events, description, secret, status, cursor)"
                f" VALUES ($1, $2, $3, $4, $5, $6, 'active', $7) RETURNING {_COLUMNS}",
                id, owner, url, events, description, secret, cursor)
        return _row(r)

    async def owned(self, owner: str) -> list[SubscriptionRow]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM subscriptions WHERE owner = $1 AND status <> 'deleted'"
                                    " ORDER BY created_at, id", owner)
        return [_row(r) for r in rows]

    async def get(self, id: str, owner: str) -> SubscriptionRow | None:
        """The owner's subscription; None for another's (so a backend cannot tell that it exists)."""
        async with self.pool.acquire() as conn:
            r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM subscriptions WHERE id = $1 AND owner = $2"
                                    " AND status <> 'deleted'", id, owner)
        return _row(r) if r is not None else None

    async def set_status(self, id: str, status: str) -> None:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("UPDATE subscriptions SET status = $2 WHERE id = $1", id, status)
                if status == "active":  # resumed: its backlog is due at once, whatever the backoff said
                    await conn.execute("UPDATE notifications SET next_attempt_at = now() WHERE subscription_id = $1"
                                       " AND delivered_at IS NULL", id)

    async def replace_patients(self, id: str, count: int, encoding: str, members: bytes) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE subscriptions SET patients_count = $2, patients_encoding = $3, patients = $4,"
                " patients_version = patients_version + 1 WHERE id = $1", id, count, encoding, members)

    async def pending_count(self, id: str) -> int:
        async with self.pool.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM notifications WHERE subscription_id = $1"
                                       " AND delivered_at IS NULL", id)

    # --- the notifier ----------------------------------------------------------------

    async def followed(self) -> list[SubscriptionRow]:
        """Every subscription notifications are made for (a paused one keeps its backlog)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM subscriptions WHERE status <> 'deleted'")
        return [_row(r) for r in rows]

    async def patients(self, id: str) -> tuple[str | None, bytes | None]:
        async with self.pool.acquire() as conn:
            r = await conn.fetchrow("SELECT patients_encoding, patients FROM subscriptions WHERE id = $1", id)
        return (r["patients_encoding"], bytes(r["patients"])) if r and r["patients"] is not None else (None, None)

    async def commit(self, made: list[Made], cursors: dict[str, int]) -> None:
        """The notifications made and the cursors they reach, all or nothing. A cursor only moves forward,
        so a second notifier racing this one cannot write a notification twice (the webhook id is unique)."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                moved = {r["id"] for r in await conn.fetch(
                    "UPDATE subscriptions s SET cursor = c.cursor FROM unnest($1::text[], $2::bigint[])"
                    " AS c (id, cursor) WHERE s.id = c.id AND s.cursor < c.cursor RETURNING s.id",
                    list(cursors), list(cursors.values()))}
                rows = [(m.subscription_id, m.webhook_id, m.type, m.position, m.body) for m in made
                        if m.subscription_id in moved]
                if rows:
                    await conn.executemany(
                        "INSERT INTO notifications (subscription_id, webhook_id, type, position, body)"
                        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (webhook_id) DO NOTHING", rows)

    # --- the deliverer ---------------------------------------------------------------

    async def due(self, limit: int) -> list[Pending]:
        """The oldest undelivered notification of each active subscription, where it is due:
        one at a time per subscription keeps its order."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT h.*, s.url, s.secret FROM (SELECT DISTINCT ON (subscription_id) * FROM notifications"
                "  WHERE delivered_at IS NULL ORDER BY subscription_id, seq) h"
                " JOIN subscriptions s ON s.id = h.subscription_id"
                " WHERE s.status = 'active' AND h.next_attempt_at <= now() ORDER BY h.next_attempt_at LIMIT $1",
                limit)
        return [Pending(r["seq"], r["subscription_id"], r["webhook_id"], r["type"], r["position"], bytes(r["body"]),
                        r["attempts"], r["first_attempt_at"], r["url"], r["secret"]) for r in rows]

    async def delivered(self, seq: int, status: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE notifications SET delivered_at = now(), attempts = attempts + 1,"
                               " first_attempt_at = coalesce(first_attempt_at, now()), last_status = $2,"
                               " last_error = NULL WHERE seq = $1", seq, status)

    async def failed(self, seq: int, status: int | None, error: str, retry_in: float) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE notifications SET attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at,"
                " now()), last_status = $2, last_error = $3, next_attempt_at = now() + make_interval(secs => $4)"
                " WHERE seq = $1", seq, status, error[:500], retry_in)

    # --- what the owner reads --------------------------------------------------------

    async def feed(self, id: str, after: int, limit: int) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(
                "SELECT seq, webhook_id, type, position, body, attempts, delivered_at, next_attempt_at, last_status,"
                " last_error FROM notifications WHERE subscription_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                id, after, limit)
