"""Patient history with many large data uses: 200 uses of 1M-patient
cohorts (200M memberships) recorded in-process through the Ledger (opt-out
check included), the uses projection applied by the runner, then history
latency for random patients and the storage the cohorts take.

    python bench/history_bench.py --database cl_bench --uses 200 --cohort-size 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

import msgspec
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bulk_load import database_dsn  # noqa: E402
from machine import describe, peak_rss_mib  # noqa: E402
from population import BASE, random_stems, valid  # noqa: E402

from contracts.bodies import DataUseRequest, GrantRequest  # noqa: E402
from contracts.cohort import encode_cohort  # noqa: E402
from contracts.nhs_number import NhsNumber  # noqa: E402
from projections.reads import history  # noqa: E402
from service import config  # noqa: E402
from service.app.caller import Caller  # noqa: E402
from service.composition import running  # noqa: E402
from service.store.database import Database  # noqa: E402

DAC = Caller(subject="bench-dac", roles=frozenset({"dac"}))
SDE = Caller(subject="bench-sde", roles=frozenset({"sde"}), org="BENCH-H")


def grant(grant_id: str) -> GrantRequest:
    now = datetime.now(timezone.utc)
    return msgspec.convert({
        "grant_id": grant_id, "organisation": {"code": "BENCH-H", "name": "History bench SDE"},
        "purpose": {"code": "planning", "description": "Bench", "patient_benefit": "Better planning"},
        "legal_basis": "public-task-health-care", "datasets": ["hes-apc"], "commercial": False,
        "exclusive": False, "valid_from": (now - timedelta(days=1)).isoformat(),
        "valid_until": (now + timedelta(days=30)).isoformat(), "approved_by": "bench",
        "opt_out_exemption": {"basis": "s251-cag", "reference": "CAG-BENCH"},
    }, GrantRequest)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database", default="cl_bench")
    p.add_argument("--uses", type=int, default=200)
    p.add_argument("--cohort-size", type=int, default=1_000_000)
    p.add_argument("--grants", type=int, default=50)
    p.add_argument("--queries", type=int, default=2000)
    args = p.parse_args()
    dsn = database_dsn(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), args.database)
    print(await describe(dsn))
    database = Database(owner_dsn=dsn, embedded=False)
    # Built by the composition root, as serve builds it (a small runner batch
    # so the bench sees the uses projection advance per use).
    ledger_parts = contextlib.AsyncExitStack()
    parts = await ledger_parts.enter_async_context(
        running(dataclasses.replace(config.load({}), pool_size=6), database))
    ledger, store, runner, pool = parts.ledger, parts.store, parts.runner, parts.pool
    runner.batch_size = 50
    tag = f"{int(time.time()) % 100000}"
    grants = [f"H{tag}-{i}" for i in range(args.grants)]
    for g in grants:
        await ledger.create_grant(DAC, grant(g), None)
    rng = np.random.default_rng(int(tag))
    sample: list[int] = []
    record_times = []
    started = time.perf_counter()
    memberships = 0
    for i in range(args.uses):
        stems = random_stems(rng, args.cohort_size).astype(np.uint32)
        sample.extend(rng.choice(stems, 10).tolist())
        t = time.perf_counter()
        cohort = await asyncio.to_thread(encode_cohort, stems)
        await ledger.store_cohort(SDE, cohort, None)
        cohort_id, size = cohort.cohort_id, len(cohort.stems)
        request = msgspec.convert({
            "use_id": f"use-{tag}-{i}", "grant_id": grants[i % len(grants)], "purpose": "planning",
            "datasets": ["hes-apc"], "occurred_at": datetime.now(timezone.utc).isoformat(),
            "access_method": "sde", "cohort_id": cohort_id,
        }, DataUseRequest)
        await ledger.record_data_use(SDE, request, None)
        record_times.append(time.perf_counter() - t)
        memberships += size
        if (i + 1) % 20 == 0:
            print(f"# {i + 1} uses, {memberships:,} memberships, {time.perf_counter() - started:.0f} s; "
                  f"uses projection at {runner.positions.get('uses')}", file=sys.stderr)
    head, _ = await store.head()
    t = time.perf_counter()
    assert await runner.wait_for(head, 3600, runner.lowest_position)
    print(f"recorded {args.uses} data uses, {memberships:,} memberships: store cohort + record use median "
          f"{statistics.median(record_times):.2f} s, max {max(record_times):.2f} s; projection caught up "
          f"{time.perf_counter() - t:.0f} s after the last write ({time.perf_counter() - started:.0f} s in all)")
    members = [NhsNumber.from_stem(s) for s in random.Random(1).sample(sample, min(len(sample), args.queries // 2))]
    strangers = valid(np.random.default_rng(5).integers(BASE, BASE + 72_000_000, args.queries))
    queries = members + [NhsNumber.from_stem(int(s)) for s in strangers[: args.queries - len(members)]]
    random.Random(2).shuffle(queries)
    latencies, found = [], []
    async with pool.acquire() as conn:
        for nhs in queries[:20]:
            await history(conn, nhs, None, 50)  # warm the cache
        for nhs in queries:
            t = time.perf_counter()
            page = await history(conn, nhs, None, 50)
            latencies.append(time.perf_counter() - t)
            found.append(sum(1 for i in page.items if i.kind == "data-use"))
        sizes = {r[0]: r[1] for r in await conn.fetch(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN"
            " ('cohorts', 'cohort_blocks', 'grant_coverage', 'data_uses_view')")}
        cohort_rows = await conn.fetchval("SELECT count(*) FROM cohorts")
        total_members = await conn.fetchval("SELECT sum(size) FROM cohorts")
    await ledger_parts.aclose()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"history (first page of 50, in-process query + assembly), {len(queries)} random patients "
          f"(half cohort members): p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1] * 1000:.1f} ms "
          f"[target p99 <= 50 ms]; data uses per member page: mean {statistics.mean(found):.1f}")
    mib = {k: v / 2**20 for k, v in sizes.items()}
    print(f"storage for {cohort_rows} cohorts, {total_members:,} memberships: cohorts {mib.get('cohorts', 0):.0f} MiB "
          f"({sizes.get('cohorts', 0) / max(total_members, 1):.2f} B/member), cohort_blocks "
          f"{mib.get('cohort_blocks', 0):.0f} MiB ({sizes.get('cohort_blocks', 0) / max(total_members, 1):.2f} B/member), "
          f"grant_coverage {mib.get('grant_coverage', 0):.0f} MiB, data_uses_view {mib.get('data_uses_view', 0):.1f} MiB")
    print(f"bench process peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
