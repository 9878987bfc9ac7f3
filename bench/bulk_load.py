"""Bulk-load opt-outs straight into a ledger database (not through HTTP).

Writes real, hash-chained OptOutRegistered entries to ``ledger_events`` with
COPY, moves ``ledger_head``, and writes the matching rows of the choices
projection (and its tracked position) directly, so a service started on the
database serves a national-size opt-out set at once.  The projection rows
are exactly what the runner would write (tests prove the runner's output;
this only saves replaying millions of events on a shared 2-core machine).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        python bench/bulk_load.py --database cl_bench --opt-outs 3500000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from machine import describe  # noqa: E402
from population import random_stems  # noqa: E402

from contracts.entry import chain_hash, encode_entry, format_recorded_at, leaf_hash  # noqa: E402
from contracts.events import OptOutRegistered  # noqa: E402
from contracts.nhs_number import NhsNumber  # noqa: E402
from contracts.values import Actor  # noqa: E402
from service.store import tiles  # noqa: E402
from service.domain.aggregates import patient_aggregate_id  # noqa: E402
from service.store.migrations import migrate  # noqa: E402

CHUNK = 50_000


def database_dsn(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def fresh_database(url: str, name: str) -> str:
    admin = await asyncpg.connect(url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = database_dsn(url, name)
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.close()
    return dsn


async def load(dsn: str, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stems = random_stems(rng, count)
    conn = await asyncpg.connect(dsn)
    head = await conn.fetchrow("SELECT position, chain_hash FROM ledger_head")
    position, chain = head["position"], bytes(head["chain_hash"])
    actor = Actor(kind="patient")
    started = time.perf_counter()
    for start in range(0, len(stems), CHUNK):
        now = datetime.now(timezone.utc)
        recorded_at = format_recorded_at(now)
        tree_size = position
        events, choices, history = [], [], []
        for stem in stems[start:start + CHUNK].tolist():
            nhs = str(NhsNumber.from_stem(stem))
            position += 1
            event_id, aggregate_id = uuid4(), patient_aggregate_id(nhs)
            entry = encode_entry(
                position=position, event_id=event_id, event_type="OptOutRegistered", aggregate_id=aggregate_id,
                aggregate_version=1, recorded_at=recorded_at,
                payload=OptOutRegistered(nhs_number=nhs, scope="national", channel="post", actor=actor,
                                         recorded_by="bench-bulk-load"),
            )
            leaf = leaf_hash(entry)
            chain = chain_hash(chain, leaf)
            events.append((position, event_id, "OptOutRegistered", aggregate_id, 1, now, entry, leaf, chain))
            choices.append((stem, "national", True, position, now))
            history.append((stem, position, "OptOutRegistered", "national", None, "post", "patient", None, now))
        async with conn.transaction():
            await conn.copy_records_to_table(
                "ledger_events", records=events,
                columns=["position", "event_id", "event_type", "aggregate_id", "aggregate_version", "recorded_at",
                         "entry", "leaf_hash", "chain_hash"])
            # The Merkle tiles the writer would store, so checkpoints can be signed at once.
            await tiles.extend(conn, tree_size, position)
            await conn.execute("UPDATE ledger_head SET position = $1, chain_hash = $2", position, chain)
            await conn.copy_records_to_table(
                "patient_choices", records=choices, columns=["stem", "scope", "opted_out", "position", "changed_at"])
            await conn.copy_records_to_table(
                "patient_choice_history", records=history,
                columns=["stem", "position", "event_type", "scope", "grant_id", "channel", "actor_kind",
                         "proxy_role", "recorded_at"])
            await conn.execute(
                "INSERT INTO projection_positions VALUES ('choices', $1)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position", position)
            # uses has nothing to do for opt-outs: it is at the head too.
            await conn.execute(
                "INSERT INTO projection_positions VALUES ('uses', $1)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position", position)
        done = start + len(events)
        rate = done / (time.perf_counter() - started)
        print(f"# {done:,} opt-outs loaded ({rate:,.0f}/s)", file=sys.stderr)
    await conn.execute("ANALYZE")
    await conn.close()
    print(f"loaded {len(stems):,} opt-outs in {time.perf_counter() - started:.1f} s; head position {position:,}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database", default="cl_bench")
    p.add_argument("--opt-outs", type=int, default=3_500_000)
    p.add_argument("--seed", type=int, default=2021)
    args = p.parse_args()
    url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

    async def run() -> None:
        print(await describe(url))
        dsn = await fresh_database(url, args.database)
        await load(dsn, args.opt_outs, args.seed)

    asyncio.run(run())


if __name__ == "__main__":
    main()
