"""Opt-out filter: 1M NHS numbers in-process and over HTTP (.dat), with
3.5M opt-outs loaded by bulk_load.py; peak service memory.

    python bench/filter_bench.py --database cl_bench
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import aiohttp
import asyncpg
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bulk_load import database_dsn  # noqa: E402
from machine import describe, peak_rss_mib, process_peak_rss_mib  # noqa: E402
from population import random_stems  # noqa: E402
from service_process import Service  # noqa: E402

from contracts import bulk  # noqa: E402
from projections.optout_filter import OptOutFilter  # noqa: E402

DAT = bulk.DAT


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc), to set beside wall-clock figures."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def query(optouts: OptOutFilter, size: int, rng: np.random.Generator) -> np.ndarray:
    opted = optouts.scopes["national"].current.array()
    some_out = rng.choice(opted, size // 20) if len(opted) else np.empty(0, np.uint32)
    rest = random_stems(rng, size - len(some_out))
    stems = np.concatenate([some_out, rest]).astype(np.uint32)
    rng.shuffle(stems)
    return stems


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database", default="cl_bench")
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    dsn = database_dsn(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), args.database)
    print(await describe(dsn))
    rss0 = peak_rss_mib()
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    t, c = time.perf_counter(), time.process_time()
    optouts = await OptOutFilter.load(pool)
    load_s, load_cpu = time.perf_counter() - t, time.process_time() - c
    await pool.close()
    print(f"decision state from the ledger's entries: {optouts.opted_out_count():,} opted out at position "
          f"{optouts.position:,}, loaded in {load_s:.2f} s (Python CPU {load_cpu:.2f} s), set size "
          f"{optouts.scopes['national'].current.base.nbytes / 2**20:.1f} MiB")
    terms = optouts.terms(None, datetime.now(timezone.utc))
    rng = np.random.default_rng(7)
    stems = query(optouts, args.size, rng)
    body = bulk.format_lines(stems, dat=True)
    times, filter_only, cpu = [], [], []
    for _ in range(args.runs):
        c = time.process_time()
        t = time.perf_counter()
        parsed = bulk.parse_lines(body, dat=True)
        t1 = time.perf_counter()
        result = optouts.filter(parsed.stems, None, terms)
        t2 = time.perf_counter()
        out = bulk.select_lines(parsed, result.keep, dat=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        filter_only.append(t2 - t1)
    print(f"in-process, {args.size:,} numbers (.dat parse + filter + .dat answer): median "
          f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
          f"(membership alone {statistics.median(filter_only) * 1000:.0f} ms; CPU median "
          f"{statistics.median(cpu) * 1000:.0f} ms); removed {result.removed:,}; "
          f"answer {len(out) / 2**20:.1f} MiB [target <= 100 ms]")
    print(f"bench process peak RSS {peak_rss_mib():.0f} MiB (was {rss0:.0f} MiB before the snapshot)")

    service = Service(dsn)
    token = service.token("sde", org="BENCH")
    await service.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            http, http_cpu = [], []
            assert service.proc is not None
            for _ in range(args.runs):
                c = cpu_seconds(service.proc.pid)
                t = time.perf_counter()
                async with s.post(service.url + "/v1/opt-out-filter", data=body,
                                  headers={"Content-Type": DAT}) as r:
                    answer = await r.read()
                    assert r.status == 200, answer[:500]
                    removed = r.headers["Ledger-Removed"]
                http.append(time.perf_counter() - t)
                http_cpu.append(cpu_seconds(service.proc.pid) - c)
            assert answer == out, "HTTP answer differs from the in-process answer"
        print(f"HTTP, {args.size:,} numbers .dat ({len(body) / 2**20:.1f} MiB) in and out: median "
              f"{statistics.median(http) * 1000:.0f} ms, max {max(http) * 1000:.0f} ms (service CPU median "
              f"{statistics.median(http_cpu) * 1000:.0f} ms); removed {removed} "
              "[target <= 1.5 s]")
        print(f"service peak RSS (VmHWM) {process_peak_rss_mib(service.proc.pid):.0f} MiB")
        print(await describe(None))
    finally:
        service.stop()


if __name__ == "__main__":
    asyncio.run(main())
