"""Delivery of the outbox as Standard Webhooks (webhook-id, webhook-timestamp,
webhook-signature, signed by the ``standardwebhooks`` package).

Each subscription's notifications go one at a time, oldest first, so a
receiver sees them in ledger order; subscriptions are served concurrently,
so a slow or dead endpoint holds up only its own. A failed attempt is
retried with exponential backoff and jitter; once a notification has failed
for the retry window the subscription is marked failing and its backlog
kept until its owner resumes it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import aiohttp
import structlog
from standardwebhooks.webhooks import Webhook

from service.notify.addresses import AddressRefused, GuardedResolver, Network, check_url
from service.notify.outbox import Outbox, Pending

log = structlog.get_logger("consent_ledger.notify")

RESPONSE_CAP = 64 * 1024  # a receiver's answer is read this far and no further
MAX_DELAY = 3600.0
AT_ONCE = 32


class Deliverer:
    def __init__(self, outbox: Outbox, allowed: list[Network], *, timeout: float, retry_base: float,
                 retry_window: float, poll: float = 0.1):
        self.outbox, self.allowed, self.timeout = outbox, allowed, timeout
        self.retry_base, self.retry_window, self.poll = retry_base, retry_window, poll

    async def run(self, beat: Callable[[], None]) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allowed), limit=AT_ONCE)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                         headers={"User-Agent": "consent-ledger-webhooks"}) as session:
            while True:
                due = await self.outbox.due(AT_ONCE)
                if due:
                    await asyncio.gather(*(self.deliver(session, p) for p in due))
                beat()
                if not due:
                    await asyncio.sleep(self.poll)

    async def deliver(self, session: aiohttp.ClientSession, p: Pending) -> bool:
        try:
            await check_url(p.url, self.allowed, resolve=False)  # names: checked by the resolver as it connects
        except AddressRefused as exc:
            await self._failed(p, None, str(exc))
            return False
        now = datetime.now(timezone.utc)
        headers = {"webhook-id": p.webhook_id, "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": Webhook(p.secret).sign(p.webhook_id, now, p.body.decode()),
                   "Content-Type": "application/json"}
        try:
            async with session.post(p.url, data=p.body, headers=headers, allow_redirects=False) as r:
                await r.content.read(RESPONSE_CAP)
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            await self._failed(p, None, f"{type(exc).__name__}: {exc}"[:300])
            return False
        if 200 <= status < 300:
            await self.outbox.delivered(p.seq, status)
            return True
        await self._failed(p, status, f"the endpoint answered HTTP {status}")
        return False

    async def _failed(self, p: Pending, status: int | None, error: str) -> None:
        delay = min(self.retry_base * 2 ** p.attempts, MAX_DELAY) * random.uniform(0.5, 1.5)
        await self.outbox.failed(p.seq, status, error, delay)
        first = p.first_attempt_at or datetime.now(timezone.utc)
        if datetime.now(timezone.utc) - first > timedelta(seconds=self.retry_window):
            await self.outbox.set_status(p.subscription_id, "failing")
            log.error("webhook subscription failing: its endpoint has refused for the whole retry window",
                      subscription=p.subscription_id, error=error)
        else:
            log.warning("webhook delivery failed; retrying", subscription=p.subscription_id, seq=p.seq,
                        attempts=p.attempts + 1, retry_in=round(delay, 2), error=error)
