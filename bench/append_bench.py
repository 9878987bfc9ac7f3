"""Append throughput with the Merkle tiles and checkpoint signing on vs off.

    DATABASE_URL=postgresql://... python bench/append_bench.py [--events 30000] [--clients 64] [--rounds 2]

Each round uses a fresh database and the real batching EventStore; "off"
replaces the tile step with a no-op and runs no checkpoint signer.
Target: "on" within 15% of "off".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts import note  # noqa: E402
from contracts.events import OptOutRegistered  # noqa: E402
from contracts.values import Actor  # noqa: E402
from service.runtime import logs  # noqa: E402
from service.store import event_store as store_module, tiles  # noqa: E402
from service.store.checkpoints import CheckpointLog  # noqa: E402
from service.runtime.supervisor import Supervisor  # noqa: E402
from service.store.database import Database  # noqa: E402
from service.store.migrations import migrate  # noqa: E402
from service.store.event_store import EventStore
from service.store.event_log import NewEvent

from machine import describe  # noqa: E402


def event() -> NewEvent:
    return NewEvent(uuid.uuid4(), "OptOutRegistered", uuid.uuid4(), 1,
                    OptOutRegistered(nhs_number="9434765919", scope="national", channel="app",
                                     actor=Actor(kind="patient"), recorded_by="bench"))


async def run(admin: str, events: int, clients: int, merkle_on: bool) -> float:
    name = f"cl_append_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))
    original = tiles.extend
    try:
        owner = await asyncpg.connect(dsn)
        await migrate(owner)
        await owner.close()
        pool = await Database(dsn, False).create_pool(min_size=4, max_size=8)
        if not merkle_on:
            async def no_tiles(*args, **kwargs) -> None:
                return None
            store_module.tiles.extend = no_tiles  # type: ignore[assignment]
        store = EventStore(pool, queue_size=10_000, max_batch=500)
        store.start()
        signer = None
        if merkle_on:
            signer = CheckpointLog(pool, tiles.TileReader(), [note.Signer.generate("bench.example/log")],
                                   "bench.example/log", 1.0)
            supervisor = Supervisor()
            supervisor.start("checkpoint-signer", signer.run, every=signer.interval)
        per_client = events // clients

        async def client() -> None:
            for _ in range(per_client):
                await store.append([event()])

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        if signer is not None:
            await signer.sign()
            await supervisor.stop()
        await store.stop()
        await pool.close()
        return per_client * clients / elapsed
    finally:
        store_module.tiles.extend = original  # type: ignore[assignment]
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        raise SystemExit("set DATABASE_URL")
    logs.configure("warning", "json")
    print(await describe(admin))
    results: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (False, True):  # interleaved, so drifting background load hits both
            rate = await run(admin, args.events, args.clients, on)
            results[on].append(rate)
            print(f"merkle+checkpoints {'on ' if on else 'off'}: {rate:,.0f} events/s")
    off, on = max(results[False]), max(results[True])
    print(f"best of {args.rounds}: off {off:,.0f}/s, on {on:,.0f}/s, on/off = {on / off:.1%} (target >= 85%)")


if __name__ == "__main__":
    asyncio.run(main())
