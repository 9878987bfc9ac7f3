"""Inclusion and consistency proof latency over a bulk-loaded ledger.

    DATABASE_URL=postgresql://... python bench/proof_bench.py [--entries 1000000] [--samples 2000]

Loads synthetic entries straight into PostgreSQL (COPY, not HTTP), builds the
Merkle tiles with the same code the writer uses, then times proofs three
ways: from the tile store with a cold tile cache (every tile read from the
database), with the service's warm cache, and end to end over HTTP on
loopback.  Target: p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts import merkle  # noqa: E402
from contracts.entry import GENESIS_CHAIN_HASH  # noqa: E402
from service.store import tiles  # noqa: E402
from service.store.migrations import migrate  # noqa: E402

from machine import describe  # noqa: E402


def _with_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def load(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        have = await conn.fetchval("SELECT position FROM ledger_head")
        if have >= count:
            print(f"reusing {have:,} loaded entries")
            return
        if have:
            raise SystemExit(f"database holds {have} entries; drop it first")
        started = time.perf_counter()
        chain = GENESIS_CHAIN_HASH
        now = datetime.now(timezone.utc)
        step = 100_000
        for first in range(1, count + 1, step):
            rows = []
            for position in range(first, min(count, first + step - 1) + 1):
                entry = b'{"event_type":"Bench","position":%d}' % position
                leaf = hashlib.sha256(b"\x00" + entry).digest()
                chain = hashlib.sha256(chain + leaf).digest()
                rows.append((position, uuid.UUID(int=position), "Bench", uuid.UUID(int=position), 1, now,
                             entry, leaf, chain))
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "ledger_events", records=rows,
                    columns=["position", "event_id", "event_type", "aggregate_id", "aggregate_version",
                             "recorded_at", "entry", "leaf_hash", "chain_hash"])
                last = rows[-1][0]
                await tiles.extend(conn, first - 1, last)
                await conn.execute("UPDATE ledger_head SET position = $1, chain_hash = $2", last, chain)
            print(f"\rloaded {last:,}", end="", flush=True)
        await conn.execute("ANALYZE")
        print(f"\nloaded {count:,} entries and tiles in {time.perf_counter() - started:.0f}s")
    finally:
        await conn.close()


def summary(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return f"{name:<34} n={len(ms):>5}  p50={p(0.50):6.2f} ms  p99={p(0.99):6.2f} ms  max={ms[-1]:6.2f} ms"


async def measure(dsn: str, size: int, samples: int) -> None:
    rng = random.Random(7)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    try:
        async with pool.acquire() as conn:
            root = await tiles.TileReader().root(conn, size)
        warm = tiles.TileReader()
        results: dict[str, list[float]] = {k: [] for k in ("inclusion cold", "inclusion warm",
                                                            "consistency cold", "consistency warm")}
        for _ in range(samples):
            index = rng.randrange(size)
            old = rng.randrange(1, size)
            for kind, reader in (("cold", tiles.TileReader()), ("warm", warm)):
                async with pool.acquire() as conn:
                    t = time.perf_counter()
                    proof = await reader.inclusion(conn, index, size)
                    results[f"inclusion {kind}"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    cproof = await reader.consistency(conn, old, size)
                    results[f"consistency {kind}"].append(time.perf_counter() - t)
            if _ % 100 == 0:  # spot-check correctness while timing
                leaf = hashlib.sha256(b'\x00{"event_type":"Bench","position":%d}' % (index + 1)).digest()
                merkle.verify_inclusion(index, size, leaf, proof, root)
                async with pool.acquire() as conn:
                    old_root = await tiles.TileReader().root(conn, old)
                merkle.verify_consistency(old, size, old_root, root, cproof)
        for name, values in results.items():
            print(summary(f"{name} (tile store)", values))
    finally:
        await pool.close()


_CLIENT = r"""
import http.client, json, random, sys, time
host, port, size, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
conn = http.client.HTTPConnection(host, port)
rng = random.Random(11)
out = {"inclusion": [], "consistency": []}
for _ in range(samples):
    for kind, path in (("inclusion", f"/v1/proofs/inclusion?position={rng.randrange(1, size + 1)}&tree_size={size}"),
                       ("consistency", f"/v1/proofs/consistency?from={rng.randrange(1, size)}&to={size}")):
        t = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
        out[kind].append(time.perf_counter() - t)
print(json.dumps(out))
"""


async def measure_http(dsn: str, size: int, samples: int) -> None:
    """End to end: the service in this process, a keep-alive client in another."""
    import json

    from aiohttp.test_utils import TestServer

    import dataclasses

    from service import config
    from service.runtime import logs
    from service.store.database import Database
    from service.http.app import create_app

    logs.configure("warning", "json")  # request logs would be timed too
    cfg = dataclasses.replace(config.load({}), pool_size=4)
    app = create_app(cfg, Database(owner_dsn=dsn, embedded=False), verifier=None)  # type: ignore[arg-type]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENT, "127.0.0.1", str(server.port), str(size), str(samples),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
    finally:
        await server.close()
    results = json.loads(out)
    print(summary("inclusion (HTTP, loopback client)", results["inclusion"]))
    print(summary("consistency (HTTP, loopback client)", results["consistency"]))


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--database", help="database name (default cl_bench_<entries>)")
    args = p.parse_args()
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        raise SystemExit("set DATABASE_URL to a PostgreSQL server the benchmark may create a database on")
    print(await describe(admin))
    name = args.database or f"cl_bench_{args.entries}"
    conn = await asyncpg.connect(admin)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = _with_db(admin, name)
    await load(dsn, args.entries)
    print(f"tree size {args.entries:,}; {args.samples} random proofs each")
    await measure(dsn, args.entries, args.samples)
    await measure_http(dsn, args.entries, args.samples)
    print(f"(database {name} kept for re-runs; drop it with DROP DATABASE \"{name}\")")


if __name__ == "__main__":
    asyncio.run(main())
