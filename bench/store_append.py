"""Store-level append throughput and latency (real PostgreSQL, fsync on).

Each producer appends one OptOutRegistered event for a new aggregate at a
time and waits for its receipt; latency is from the append() call to the
receipt.  Every configuration runs in a fresh database in separate OS
processes (one EventStore each, as the service would run), so
``--processes 2 --producers 32`` exercises the head-row lock between writers.

    .venv/bin/python -m bench.store_append                      # 1, 8, 64 producers, 1 process
    .venv/bin/python -m bench.store_append --processes 2 --producers 32
    .venv/bin/python -m bench.store_append --embedded           # private pgserver instead

Loops are bounded by both --duration and --max-events; only 127.0.0.1 is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit
from uuid import uuid4

import numpy as np

from contracts.events import OptOutRegistered
from contracts.nhs_number import NhsNumber, check_digit
from contracts.values import Actor
from service.store.database import Database
from service.store.event_store import EventStore
from service.store.event_log import NewEvent

from .machine import (
    backend_pids,
    cpu_seconds,
    load_average,
    peak_rss_mib,
    postgres_details,
    print_machine,
    require_durable,
    self_cpu_seconds,
)
from .scratch_db import scratch_database, server_dsn


def _nhs_numbers(count: int) -> list[str]:
    out = []
    stem = 999_000_000
    while len(out) < count:
        if check_digit(f"{stem:09d}") is not None:
            out.append(str(NhsNumber.from_stem(stem)))
        stem += 1
    return out


@dataclass
class ProcessResult:
    events: int
    latencies: bytes  # float64 seconds
    first_start: float
    last_end: float
    peak_rss_mib: float
    errors: int
    cpu_seconds: float


async def _produce(dsn: str, producers: int, start_at: float, duration: float, max_events: int,
                   max_batch: int, out: mp.Queue, release) -> None:
    database = Database(owner_dsn=dsn, embedded=False)
    pool = await database.create_pool(min_size=1, max_size=2)
    store = EventStore(pool, queue_size=max(10_000, producers * 2), max_batch=max_batch)
    store.start()
    numbers = _nhs_numbers(1000)
    actor = Actor(kind="patient")
    payloads = [OptOutRegistered(nhs_number=n, scope="national", channel="app", actor=actor,
                                 recorded_by="bench") for n in numbers]
    per_producer = max(1, max_events // producers)
    latencies: list[list[float]] = [[] for _ in range(producers)]
    errors = 0

    async def producer(i: int, deadline: float, limit: int, record: bool) -> None:
        nonlocal errors
        out = latencies[i]
        n = 0
        while n < limit and time.time() < deadline:
            event = NewEvent(uuid4(), "OptOutRegistered", uuid4(), 1, payloads[(i * 7919 + n) % len(payloads)])
            t0 = time.perf_counter()
            try:
                await store.append([event])
            except Exception:  # noqa: BLE001 - counted and reported, never hidden
                errors += 1
            else:
                if record:
                    out.append(time.perf_counter() - t0)
            n += 1

    try:
        # Warm up connections and code paths before the common start time.
        await asyncio.gather(*(producer(i, time.time() + 0.5, 20, False) for i in range(producers)))
        errors = 0
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu_start = self_cpu_seconds()
        t_start = time.time()
        await asyncio.gather(*(producer(i, start_at + duration, per_producer, True) for i in range(producers)))
        t_end = time.time()
        cpu = self_cpu_seconds() - cpu_start
        flat = np.fromiter((x for xs in latencies for x in xs), dtype=np.float64)
        out.put(ProcessResult(len(flat), flat.tobytes(), t_start, t_end, peak_rss_mib(), errors, cpu))
        # Keep the connections (and so their backends' CPU counters) until the parent has read them.
        await asyncio.to_thread(release.wait, 120)
    finally:
        await store.stop()
        await pool.close()


def _child(dsn: str, producers: int, start_at: float, duration: float, max_events: int, max_batch: int,
           out: mp.Queue, release) -> None:
    asyncio.run(_produce(dsn, producers, start_at, duration, max_events, max_batch, out, release))


async def _verify(dsn: str, expected: int) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        count, top, distinct = await conn.fetchrow(
            "SELECT count(*), coalesce(max(position), 0), count(DISTINCT position) FROM ledger_events")
        head = await conn.fetchval("SELECT position FROM ledger_head")
    finally:
        await conn.close()
    ok = count == top == distinct == head and count >= expected
    return f"{'ok' if ok else 'MISMATCH'}: {count} rows, positions 1..{top}, head {head}"


def run_config(admin_dsn: str, processes: int, producers: int, duration: float, max_events: int,
               max_batch: int) -> dict[str, float]:
    async def setup_and_run() -> dict[str, float]:
        async with scratch_database(admin_dsn) as db:
            ctx = mp.get_context("spawn")
            queue: mp.Queue = ctx.Queue()
            release = ctx.Event()
            start_at = time.time() + 3.0  # time for every child to start, connect and warm up
            children = [
                ctx.Process(target=_child, args=(db.owner_dsn, producers, start_at, duration,
                                                 max_events // processes, max_batch, queue, release))
                for _ in range(processes)
            ]
            load_before = load_average()
            for c in children:
                c.start()
            await asyncio.sleep(max(0.0, start_at - 0.1 - time.time()))
            database_name = urlsplit(db.owner_dsn).path.lstrip("/")
            backends = await backend_pids(admin_dsn, database_name)
            pg_cpu_start = sum(cpu_seconds(p) for p in backends)
            results: list[ProcessResult] = []
            try:
                for _ in children:
                    results.append(await asyncio.to_thread(queue.get, True, duration + 120))
                pg_cpu = sum(cpu_seconds(p) for p in backends) - pg_cpu_start
            finally:
                release.set()
                for c in children:
                    c.join(timeout=30)
            load_after = load_average()
            verified = await _verify(db.owner_dsn, sum(r.events for r in results))
        lat = np.concatenate([np.frombuffer(r.latencies, dtype=np.float64) for r in results]) * 1000
        events = sum(r.events for r in results)
        wall = max(r.last_end for r in results) - min(r.first_start for r in results)
        figures = {
            "events_per_s": events / wall,
            "p50_ms": float(np.percentile(lat, 50)) if events else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if events else float("nan"),
            "max_ms": float(lat.max()) if events else float("nan"),
            "peak_rss_mib": max(r.peak_rss_mib for r in results),
            "python_cpu_us": sum(r.cpu_seconds for r in results) / max(1, events) * 1e6,
            "postgres_cpu_us": pg_cpu / max(1, events) * 1e6,
        }
        print(f"{processes} proc x {producers:>2} producers: {events:>7} events in {wall:5.1f} s = "
              f"{figures['events_per_s']:>8.0f} events/s | p50 {figures['p50_ms']:.2f} ms | "
              f"p99 {figures['p99_ms']:.2f} ms | max {figures['max_ms']:.1f} ms | "
              f"peak RSS {figures['peak_rss_mib']:.0f} MiB/process | errors {sum(r.errors for r in results)}")
        total_cpu = figures["python_cpu_us"] + figures["postgres_cpu_us"]
        print(f"    CPU per event: python {figures['python_cpu_us']:.0f} us, postgres {figures['postgres_cpu_us']:.0f} us"
              f" (at this CPU cost 2 idle cores could do at most ~{2e6 / max(total_cpu, 1e-9):.0f} events/s)")
        print(f"    load before {load_before}; after {load_after}; log check {verified}", flush=True)
        return figures

    return asyncio.run(setup_and_run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embedded", action="store_true", help="use a private pgserver, not DATABASE_URL")
    p.add_argument("--producers", default="1,8,64", help="comma-separated producer counts per process")
    p.add_argument("--processes", type=int, default=1, help="OS processes, each with its own EventStore")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per configuration")
    p.add_argument("--max-events", type=int, default=1_000_000, help="upper bound per configuration")
    p.add_argument("--max-batch", type=int, default=500, help="EventStore max_batch (service default 500)")
    args = p.parse_args()
    if not 0 < args.duration <= 600 or not 0 < args.processes <= 16:
        raise SystemExit("--duration must be in (0, 600] and --processes in (0, 16]")

    admin = server_dsn(args.embedded)
    pg = asyncio.run(postgres_details(admin))
    print("# store append benchmark")
    print_machine(pg)
    require_durable(pg)
    print(f"server: {'embedded pgserver' if args.embedded else 'DATABASE_URL / local server'}; "
          f"max_batch {args.max_batch}; duration {args.duration} s; pid {os.getpid()}", flush=True)
    for producers in (int(x) for x in args.producers.split(",")):
        run_config(admin, args.processes, producers, args.duration, args.max_events, args.max_batch)


if __name__ == "__main__":
    main()
