"""A webhook receiver on loopback, as a patient app backend would run one: it
verifies every delivery with the Standard Webhooks reference library and can
be told to fail, or to be slow, for a while."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook


class Receiver:
    def __init__(self) -> None:
        self.secret: str | None = None
        self.received: list[dict] = []  # every verified delivery, duplicates included
        self.refused: list[str] = []    # deliveries whose signature did not verify
        self.fail_next = 0              # answer 500 to this many requests
        self.stall_next = 0             # answer this many only after `stall` seconds
        self.stall = 0.0
        self.delay = 0.0                # every request takes this long
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/hooks"

    async def __aenter__(self) -> Receiver:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.stall_next:
            self.stall_next -= 1
            await asyncio.sleep(self.stall)
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500, text="not now")
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except Exception as exc:  # noqa: BLE001 - any verification failure is a refusal
            self.refused.append(f"{type(exc).__name__}: {exc}")
            return web.Response(status=400, text="bad signature")
        self.received.append({"id": request.headers["webhook-id"], **payload})
        return web.Response(status=204)

    def unique(self) -> list[dict]:
        """First receipt of each webhook id, in the order received: what a de-duplicating backend keeps."""
        seen: set[str] = set()
        out = []
        for d in self.received:
            if d["id"] not in seen:
                seen.add(d["id"])
                out.append(d)
        return out

    async def wait_for(self, count: int, seconds: float = 30.0) -> list[dict]:
        for _ in range(int(seconds * 20)):
            if len(self.unique()) >= count:
                return self.unique()
            await asyncio.sleep(0.05)
        raise AssertionError(f"received {len(self.unique())} of {count} notifications: "
                             f"{json.dumps([d['type'] for d in self.unique()])}")
