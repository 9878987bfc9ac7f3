"""Per-request limits that are not about bodies (those live in contracts.api).

A request that takes longer than the configured timeout, including a client
that trickles its body in slowly, is answered with 503 + Retry-After rather
than holding a connection and its memory indefinitely.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.http.problems import ProblemError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_timeout(seconds: float) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            async with asyncio.timeout(seconds):
                return await handler(request)
        except TimeoutError:
            # A write still queued is dropped (the writer skips abandoned
            # appends), one already committing may land: a retry with the
            # same Idempotency-Key is safe either way.
            raise ProblemError(
                503, "timeout", "Request timed out",
                f"the request did not complete within {seconds:g} s; retry (with the same Idempotency-Key for "
                "writes)", headers={"Retry-After": "1"},
            ) from None

    return limit
