"""Projection lag under a sustained write load (default 5,000 events/s).

A writer subprocess appends opt-out choices through the EventStore (the
batching writer, NOTIFY and all) at a fixed rate; this process runs the
projection runner (choices + uses projections and the in-memory filter)
and records, for every event, the time from its recorded_at to the moment
all three reflect it.

    python bench/lag_bench.py --database cl_lag --rate 5000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from datetime import datetime
from uuid import uuid4

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bulk_load import database_dsn, fresh_database  # noqa: E402
from machine import describe  # noqa: E402

from contracts.events import OptOutRegistered, OptOutWithdrawn  # noqa: E402
from contracts.nhs_number import NhsNumber  # noqa: E402
from contracts.values import Actor  # noqa: E402
from projections.choices import ChoicesProjection  # noqa: E402
from projections.optout_filter import OptOutFilter  # noqa: E402
from projections.runner import Projection, Runner, ledger_head  # noqa: E402
from projections.uses import UsesProjection  # noqa: E402
from service.domain.aggregates import patient_aggregate_id  # noqa: E402
from service.runtime.supervisor import Supervisor  # noqa: E402
from service.store.database import Database  # noqa: E402
from service.store.event_store import EventStore
from service.store.event_log import NewEvent


class LagMeter(Projection):
    """Notes how late each event reaches every consumer: the runner's last
    projection, so it sees a batch once the others have committed it (its
    own position row is the only thing it writes)."""

    name = "bench-lag-meter"
    tables = ()

    def __init__(self) -> None:
        super().__init__()
        self.lags: list[float] = []

    async def apply(self, conn, entries) -> None:  # type: ignore[no-untyped-def]
        now = time.time()
        self.lags.extend(now - datetime.fromisoformat(e.recorded_at).timestamp() for e in entries)


async def writer(dsn: str, rate: int, seconds: float) -> None:
    database = Database(owner_dsn=dsn, embedded=False)
    pool = await database.create_pool(min_size=4, max_size=8)
    store = EventStore(pool, queue_size=100_000, max_batch=1000)
    store.start()
    rng = np.random.default_rng()
    actor = Actor(kind="patient")
    versions: dict[int, int] = {}
    stems = rng.integers(400_000_000, 472_000_000, 200_000).tolist()
    valid = []
    for s in stems:
        try:
            valid.append((s, str(NhsNumber.from_stem(s))))
        except ValueError:
            pass
    pending: set[asyncio.Task[object]] = set()
    refused = [0]

    def settled(task: asyncio.Task[object]) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            refused[0] += 1
    sent = failed = 0
    tick = 0.01
    per_tick = rate * tick
    started = time.perf_counter()
    owed = 0.0
    i = 0
    while (elapsed := time.perf_counter() - started) < seconds:
        owed += per_tick
        while owed >= 1:
            owed -= 1
            stem, nhs = valid[i % len(valid)]
            i += 1
            version = versions.get(stem, 0) + 1
            versions[stem] = version
            cls = OptOutRegistered if version % 2 else OptOutWithdrawn
            event = NewEvent(uuid4(), cls.__name__, patient_aggregate_id(nhs), version,
                             cls(nhs_number=nhs, scope="national", channel="app", actor=actor, recorded_by="bench"))
            task = asyncio.create_task(store.append([event]))
            pending.add(task)
            task.add_done_callback(settled)
            sent += 1
        await asyncio.sleep(max(0.0, started + (elapsed // tick + 1) * tick - time.perf_counter()))
    await asyncio.gather(*pending, return_exceptions=True)
    failed = refused[0]
    took = time.perf_counter() - started
    print(f"writer: {sent:,} events offered in {took:.1f} s ({sent / took:,.0f}/s), {failed} refused", flush=True)
    await store.stop()
    await pool.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database", default="cl_lag")
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if args.writer:
        await writer(database_dsn(url, args.database), args.rate, args.seconds)
        return
    print(describe())
    dsn = await fresh_database(url, args.database)
    database = Database(owner_dsn=dsn, embedded=False)
    pool = await database.create_pool(min_size=2, max_size=4)
    meter = LagMeter()
    runner = Runner(pool, [ChoicesProjection(), UsesProjection(), meter], followers=[OptOutFilter()],
                    listen=database.connect_app, batch_size=5000)
    await runner.prepare()
    supervisor = Supervisor()
    supervisor.start("projection-runner", runner.run)
    proc = subprocess.Popen([sys.executable, __file__, "--writer", "--database", args.database,
                             "--rate", str(args.rate), "--seconds", str(args.seconds)])
    await asyncio.get_running_loop().run_in_executor(None, proc.wait)
    async with pool.acquire() as conn:
        head = await ledger_head(conn)
    while not await runner.wait_for(head, 5, runner.lowest_position):
        print(f"# waiting: head {head}, positions {runner.positions}, restarts {supervisor.tasks['projection-runner'].restarts}", file=sys.stderr)
    await supervisor.stop()
    await runner.close()
    await pool.close()
    lags = np.array(meter.lags) * 1000
    print(f"projection lag (recorded_at -> choices + uses views committed and filter updated) over "
          f"{len(lags):,} events: p50 {np.percentile(lags, 50):.0f} ms, p99 {np.percentile(lags, 99):.0f} ms, "
          f"max {lags.max():.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
