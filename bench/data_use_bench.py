"""Record a data use with a 5M-patient cohort through HTTP, opt-out check included.

Steps (each timed): filter the 5M list (.dat), store the filtered list as a
cohort (.dat), record the data use by cohort_id (the service checks the
whole cohort against the opt-out state at the position it records).

    python bench/data_use_bench.py --database cl_bench
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import datetime, timedelta, timezone

import aiohttp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from bulk_load import database_dsn  # noqa: E402
from machine import describe, process_peak_rss_mib  # noqa: E402
from population import random_stems  # noqa: E402
from service_process import Service  # noqa: E402

from contracts import bulk  # noqa: E402


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database", default="cl_bench")
    p.add_argument("--size", type=int, default=5_000_000)
    args = p.parse_args()
    dsn = database_dsn(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), args.database)
    print(await describe(dsn))
    stems = random_stems(np.random.default_rng(99), args.size).astype(np.uint32)
    body = bulk.format_lines(stems, dat=True)
    service = Service(dsn)
    sde = {"Authorization": f"Bearer {service.token('sde', org='BENCH')}"}
    dac = {"Authorization": f"Bearer {service.token('dac')}"}
    await service.start()
    grant_id = f"BENCH-{int(time.time())}"
    now = datetime.now(timezone.utc)
    grant = {
        "grant_id": grant_id, "organisation": {"code": "BENCH", "name": "Benchmark SDE"},
        "purpose": {"code": "research", "description": "Benchmark", "patient_benefit": "Faster releases"},
        "legal_basis": "public-task-research", "datasets": ["hes-apc"], "commercial": False, "exclusive": False,
        "valid_from": (now - timedelta(days=1)).isoformat(), "valid_until": (now + timedelta(days=30)).isoformat(),
        "approved_by": "bench",
    }
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.post(service.url + "/v1/grants", json=grant, headers=dac) as r:
                assert r.status == 201, await r.text()
            t = time.perf_counter()
            async with s.post(service.url + "/v1/opt-out-filter", data=body,
                              headers={**sde, "Content-Type": bulk.DAT}) as r:
                filtered = await r.read()
                assert r.status == 200, filtered[:300]
                removed = int(r.headers["Ledger-Removed"])
            filter_s = time.perf_counter() - t
            t = time.perf_counter()
            async with s.post(service.url + "/v1/cohorts", data=filtered,
                              headers={**sde, "Content-Type": bulk.DAT}) as r:
                cohort = await r.json()
                assert r.status == 201, cohort
            cohort_s = time.perf_counter() - t
            use = {"use_id": f"use-{grant_id}", "grant_id": grant_id, "purpose": "research", "datasets": ["hes-apc"],
                   "occurred_at": datetime.now(timezone.utc).isoformat(), "access_method": "sde",
                   "cohort_id": cohort["cohort_id"]}
            t = time.perf_counter()
            async with s.post(service.url + "/v1/data-uses", json=use, headers=sde) as r:
                receipt = await r.json()
                assert r.status == 201, receipt
            use_s = time.perf_counter() - t
            # A member's receipt for the use: the first builds the cohort's tree, later ones reuse it.
            member = filtered[:10].decode()  # the first number of the filtered .dat
            own = {"Authorization": f"Bearer {service.token('patient-app')}"}
            receipt_times = []
            for _ in range(101):
                t = time.perf_counter()
                async with s.get(f"{service.url}/v1/patients/{member}/receipts/{receipt['position']}",
                                 headers=own) as r:
                    proof = await r.json()
                    assert r.status == 200 and proof["cohort"]["member"], proof
                receipt_times.append(time.perf_counter() - t)
        first, rest = receipt_times[0], sorted(receipt_times[1:])
        assert service.proc is not None
        print(f"{args.size:,}-patient list: filter {filter_s:.2f} s ({removed:,} removed); "
              f"store cohort of {cohort['size']:,} {cohort_s:.2f} s; record data use by cohort_id "
              f"(opt-out check of {cohort['size']:,}) {use_s:.2f} s [target <= 15 s]; "
              f"all three {filter_s + cohort_s + use_s:.2f} s; position {receipt['position']:,}")
        print(f"member's receipt for the use (with the cohort proof): first {first * 1000:.0f} ms (builds the "
              f"tree), then p50 {rest[len(rest) // 2] * 1000:.1f} ms, p99 {rest[int(len(rest) * 0.99)] * 1000:.1f} ms "
              f"[target p99 <= 20 ms]")
        print(f"service peak RSS (VmHWM) {process_peak_rss_mib(service.proc.pid):.0f} MiB")
    finally:
        service.stop()


if __name__ == "__main__":
    asyncio.run(main())
