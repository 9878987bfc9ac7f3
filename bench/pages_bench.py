"""Page figures: how long people wait for the pages at national scale.

    .venv/bin/python -m bench.pages_bench                    # 1,000,000 opt-outs, 300 grants
    .venv/bin/python -m bench.pages_bench --opt-outs 100000 --embedded

Loads opt-outs with `consent-ledger import-fhir` (the fastest honest way to
fill the choices projection), records grants, then asks each page over
loopback: /statistics once cold (its figures scan the projection tables;
cached a minute after) and warm, and /, /register, /register/<id>,
/transparency and /docs repeatedly, printing p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import msgspec
from aiohttp.test_utils import TestServer
from joserfc.jwk import KeySet, OKPKey

from contracts.bodies import GrantRequest
from service import config
from service.app.caller import Caller
from service.auth.tokens import Verifier
from service.composition import running
from service.http.app import create_app
from service.runtime import logs

from .fhir_bench import bench_import
from .machine import peak_rss_mib, postgres_details, print_machine, self_cpu_seconds
from .scratch_db import scratch_database, server_dsn

PAGES = ["/", "/register", "/register/PAGES-0007", "/transparency", "/docs"]


async def record_grants(db, cfg, count: int) -> None:
    dac = Caller("bench-dac", frozenset({"dac"}))
    now = datetime.now(timezone.utc)
    async with running(cfg, db) as parts:
        for i in range(count):
            await parts.ledger.create_grant(dac, msgspec.convert({
                "grant_id": f"PAGES-{i:04d}", "organisation": {"code": f"ORG{i % 40}", "name": f"Organisation {i % 40}"},
                "purpose": {"code": ("research", "planning", "public-health")[i % 3],
                            "description": f"Study {i} of outcomes after treatment", "patient_benefit": "figures"},
                "legal_basis": "public-task-research", "datasets": ["hes-apc", "gp-prescribing"],
                "commercial": i % 5 == 0, "exclusive": False, "valid_from": now.isoformat(),
                "valid_until": now.replace(year=now.year + 1).isoformat(), "approved_by": "bench"}, GrantRequest), None)
        head, _ = await parts.store.head()
        assert await parts.runner.wait_for(head, 300, parts.runner.lowest_position)


async def bench_pages(db, cfg, requests: int) -> None:
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "bench"})
    logs.configure("warning", "json")
    server = TestServer(create_app(cfg, db, Verifier(KeySet([key]), issuer="bench", audience="consent-ledger")),
                        host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
            async def get(path: str) -> float:
                started = time.perf_counter()
                async with session.get(path) as r:
                    body = await r.read()
                    assert r.status == 200, (path, body[:300])
                return time.perf_counter() - started

            cold = await get("/statistics")
            warm = sorted([await get("/statistics") for _ in range(requests)])
            print(f"/statistics: first (computing the figures) {cold * 1000:,.0f} ms; cached: "
                  f"p50 {warm[len(warm) // 2] * 1000:.1f} ms, p99 {warm[int(len(warm) * 0.99)] * 1000:.1f} ms")
            for path in PAGES:
                times = sorted([await get(path) for _ in range(requests)])
                print(f"{path}: {requests} requests, p50 {times[len(times) // 2] * 1000:.1f} ms, "
                      f"p99 {times[int(len(times) * 0.99)] * 1000:.1f} ms")
    finally:
        await server.close()
    print(f"bench process peak RSS {peak_rss_mib():.0f} MiB, CPU {self_cpu_seconds():.1f} s")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--embedded", action="store_true", help="use a private pgserver, not DATABASE_URL")
    p.add_argument("--opt-outs", type=int, default=1_000_000)
    p.add_argument("--grants", type=int, default=300)
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    admin = server_dsn(args.embedded)
    print("# Pages benchmark")
    print_machine(await postgres_details(admin))
    cfg = dataclasses.replace(config.load({}), pool_size=4)
    with tempfile.TemporaryDirectory(prefix="cl-bench-pages-") as tmp:
        async with scratch_database(admin) as db:
            await bench_import(db, args.opt_outs, Path(tmp))
            await record_grants(db, cfg, args.grants)
            await bench_pages(db, cfg, args.requests)


if __name__ == "__main__":
    asyncio.run(main())
