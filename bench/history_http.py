"""History over HTTP for random patients on a database prepared by history_bench.py.

    python bench/history_http.py --database cl_bench --queries 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import aiohttp
import asyncpg
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bulk_load import database_dsn  # noqa: E402
from machine import describe  # noqa: E402
from population import BASE, valid  # noqa: E402
from service_process import Service  # noqa: E402

from contracts import cohort as cohorts  # noqa: E402
from contracts.nhs_number import NhsNumber  # noqa: E402


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database", default="cl_bench")
    p.add_argument("--queries", type=int, default=1000)
    args = p.parse_args()
    dsn = database_dsn(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), args.database)
    print(describe())
    rng = np.random.default_rng(11)
    conn = await asyncpg.connect(dsn)
    rows = await conn.fetch("SELECT encoding, members FROM cohorts ORDER BY random() LIMIT 20")
    await conn.close()
    members = np.concatenate([rng.choice(cohorts.decode_members(r[0], r[1]), args.queries // 40) for r in rows])
    strangers = valid(rng.integers(BASE, BASE + 72_000_000, args.queries))[: args.queries - len(members)]
    stems = np.concatenate([members, strangers])
    rng.shuffle(stems)
    service = Service(dsn)
    headers = {"Authorization": f"Bearer {service.token('patient-app')}"}
    await service.start()
    try:
        latencies = []
        async with aiohttp.ClientSession(headers=headers) as s:
            for stem in stems[:50].tolist():  # warm up connections and caches; not counted
                async with s.get(f"{service.url}/v1/patients/{NhsNumber.from_stem(int(stem))}/history") as r:
                    await r.read()
            for stem in stems.tolist():
                nhs = NhsNumber.from_stem(int(stem))
                t = time.perf_counter()
                async with s.get(f"{service.url}/v1/patients/{nhs}/history?limit=50") as r:
                    await r.read()
                    assert r.status == 200
                latencies.append(time.perf_counter() - t)
        lat = np.array(latencies) * 1000
        print(f"history over HTTP, {len(lat)} random patients (half cohort members), first page of 50: "
              f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms "
              "[target p99 <= 50 ms]")
    finally:
        service.stop()


if __name__ == "__main__":
    asyncio.run(main())
