"""Notification figures: a 5M-member data use against 1M subscribed patients.

    .venv/bin/python -m bench.notify_bench                     # 5,000,000 members, 1,000,000 subscribed
    .venv/bin/python -m bench.notify_bench --members 500000 --subscribed 100000 --embedded

Records the use, then times: the notifier making and committing every
notification (one per 10,000 subscribed members it included), and their
delivery as signed webhooks to a receiver on loopback (target: all handed
over within 60 s). Meanwhile a writer records single opt-outs as fast as it
can, and its rate is compared with the same writer's rate just before.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from datetime import datetime, timezone

import msgspec
import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer

from contracts import cohort as cohorts
from contracts.bodies import ChoiceRequest, DataUseRequest, GrantRequest
from contracts.nhs_number import NhsNumber
from service import config
from service.app.caller import Caller
from service.composition import running
from service.runtime import logs

from .machine import peak_rss_mib, postgres_details, print_machine, self_cpu_seconds
from .population import random_stems
from .scratch_db import scratch_database, server_dsn

APP = Caller("bench-app", frozenset({"patient-app"}))


class Receiver:
    def __init__(self) -> None:
        self.deliveries = 0
        self.patients = 0
        self.bytes = 0
        self.last = 0.0
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_post("/hooks", self.hook)
        self.server = TestServer(app, host="127.0.0.1")

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bytes += len(body)
        self.deliveries += 1
        self.patients += len(msgspec.json.decode(body)["data"].get("patients", []))
        self.last = time.perf_counter()
        return web.Response(status=204)


async def writes_per_second(parts, seconds: float, stems: np.ndarray) -> float:
    """Single opt-outs, one after another, for ``seconds`` (patients in no cohort of the bench)."""
    request = msgspec.convert({"scope": "national", "channel": "phone", "actor": {"kind": "patient"}}, ChoiceRequest)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        await parts.ledger.choose(APP, NhsNumber.from_stem(int(stems[done % len(stems)])), True, request, None)
        done += 1
    return done / (time.perf_counter() - started)


async def bench(db, members: int, subscribed: int) -> None:
    rng = np.random.default_rng(13)
    logs.configure("warning", "json")
    receiver = Receiver()
    await receiver.server.start_server()
    cfg = dataclasses.replace(config.load({}), pool_size=8, webhook_allow=("127.0.0.0/8",),
                              projection_poll_interval=0.05)
    dac, sde = Caller("bench-dac", frozenset({"dac"})), Caller("bench-sde", frozenset({"sde"}), org="BENCH")
    try:
        async with running(cfg, db) as parts:
            now = datetime.now(timezone.utc)
            await parts.ledger.create_grant(dac, msgspec.convert({
                "grant_id": "NOTIFY-BENCH", "organisation": {"code": "BENCH", "name": "Bench SDE"},
                "purpose": {"code": "research", "description": "bench", "patient_benefit": "figures"},
                "legal_basis": "public-task-research", "datasets": ["hes-apc"], "commercial": False,
                "exclusive": False, "valid_from": now.isoformat(), "valid_until": now.replace(year=now.year + 1)
                .isoformat(), "approved_by": "bench"}, GrantRequest), None)
            population = random_stems(rng, members + subscribed // 2)
            cohort_stems = np.sort(population[rng.permutation(len(population))[:members]])
            # Half the subscribed patients are in the cohort; the other half are not.
            inside = cohort_stems[rng.permutation(len(cohort_stems))[:subscribed // 2]]
            outside = np.setdiff1d(population, cohort_stems, assume_unique=True)[:subscribed - len(inside)]
            subscribed_stems = cohorts.normalise(np.concatenate([inside, outside]))
            head, _ = await parts.store.head()
            await parts.outbox.create("b" * 32, "bench-backend", f"http://127.0.0.1:{receiver.server.port}/hooks",
                                      ["data-use.included"], "bench", "whsec_" + "A" * 32, head)
            await parts.outbox.replace_patients("b" * 32, len(subscribed_stems),
                                                *cohorts.encode_members(subscribed_stems))
            writers = np.setdiff1d(random_stems(rng, 40_000), population)
            baseline = await writes_per_second(parts, 5.0, writers[:20_000])

            cohort = cohorts.encode_cohort(cohort_stems)
            began = time.perf_counter()
            await parts.ledger.store_cohort(sde, cohort, None)
            receipt = (await parts.ledger.record_data_use(sde, msgspec.convert({
                "use_id": "u-notify", "grant_id": "NOTIFY-BENCH", "purpose": "research", "datasets": ["hes-apc"],
                "occurred_at": datetime.now(timezone.utc).isoformat(), "access_method": "sde",
                "cohort_id": cohort.cohort_id}, DataUseRequest), None)).receipt
            recorded = time.perf_counter()
            expected = (len(inside) + 9_999) // 10_000
            during = asyncio.create_task(writes_per_second(parts, 15.0, writers[20_000:]))
            enqueued = None
            while receiver.deliveries < expected:
                if enqueued is None and await parts.outbox.pending_count("b" * 32) + receiver.deliveries >= expected:
                    enqueued = time.perf_counter()
                if time.perf_counter() - recorded > 300:
                    raise SystemExit(f"only {receiver.deliveries} of {expected} deliveries after 300 s")
                await asyncio.sleep(0.02)
            while_writing = await during
    finally:
        await receiver.server.close()
    delivered = receiver.last - recorded
    print(f"data use of {members:,} members (position {receipt.position}) recorded in {recorded - began:.2f} s "
          f"(cohort stored with it); {len(subscribed_stems):,} subscribed patients, {len(inside):,} of them in it")
    if not expected:  # the control run: the same use and writer, no subscriber
        print(f"no subscriber (control): writer meanwhile {while_writing:,.0f} single opt-outs/s, against "
              f"{baseline:,.0f}/s just before ({while_writing / baseline:.0%})")
        return
    print(f"notifications made and committed: {expected} ({len(inside):,} patients) within "
          f"{(enqueued or receiver.last) - recorded:.2f} s of the use being recorded")
    print(f"all delivered within {delivered:.2f} s [target <= 60 s]: {receiver.deliveries / delivered:.1f} "
          f"deliveries/s, {receiver.patients / delivered:,.0f} patients/s, {receiver.bytes / 2**20:.0f} MiB of JSON")
    print(f"writer meanwhile: {while_writing:,.0f} single opt-outs/s, against {baseline:,.0f}/s just before "
          f"({while_writing / baseline:.0%})")
    print(f"bench process peak RSS {peak_rss_mib():.0f} MiB, CPU {self_cpu_seconds():.1f} s")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--embedded", action="store_true", help="use a private pgserver, not DATABASE_URL")
    p.add_argument("--members", type=int, default=5_000_000)
    p.add_argument("--subscribed", type=int, default=1_000_000)
    args = p.parse_args()
    admin = server_dsn(args.embedded)
    print("# Notification benchmark")
    print_machine(await postgres_details(admin))
    async with scratch_database(admin) as db:
        await bench(db, args.members, args.subscribed)


if __name__ == "__main__":
    asyncio.run(main())
