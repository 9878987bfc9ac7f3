"""Projections against a real PostgreSQL: differential against a reference
folded from the raw events, exactly-once across failures, rebuild."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import asyncpg
import numpy as np
import pytest
from projection_reference import Reference, all_entries, random_operation, stems_of
from samples import nhs_numbers

from projections import rebuild as admin
from projections.choices import ChoicesProjection
from projections.optout_filter import OptOutFilter
from projections.reads import history
from projections.runner import Projection, Runner
from projections.uses import UsesProjection
from service.app.assessors import ProjectedOptOutAssessor
from service.app.ledger import Ledger
from service.runtime.supervisor import Supervisor
from service.store.database import Database
from service.store.event_store import EventStore

VIEW_ORDER = {
    "patient_choices": "stem, scope",
    "patient_consents": "stem, grant_id",
    "patient_choice_history": "stem, position",
    "grants_view": "grant_id",
    "data_uses_view": "position",
    "cohort_blocks": "block, cohort_id",
    "grant_coverage": "grant_id",
}


async def dump_views(conn: asyncpg.Connection) -> dict[str, list[str]]:
    return {
        t: [r[0] for r in await conn.fetch(f"SELECT x::text FROM {t} x ORDER BY {order}")]
        for t, order in VIEW_ORDER.items()
    }


def make_runner(pool: asyncpg.Pool, database: Database, optouts: OptOutFilter | None = None) -> Runner:
    return Runner(pool, [ChoicesProjection(), UsesProjection()], followers=[optouts] if optouts else [],
                  listen=database.connect_app, batch_size=7, poll_interval=0.2)


async def follow_live(runner: Runner) -> Supervisor:
    """The runner following the ledger in the background, as the service runs it."""
    await runner.prepare()
    supervisor = Supervisor()
    supervisor.start("projection-runner", runner.run, every=runner.poll_interval)
    return supervisor


async def check_against_reference(conn: asyncpg.Connection, optouts: OptOutFilter, patients: list[str],
                                  grants: list[str], cohorts: dict[str, set[int]]) -> Reference:
    ref = Reference.fold(await all_entries(conn))
    assert optouts.position == ref.head
    stems = stems_of(patients)
    for grant_id in [None, *grants]:
        got = optouts.filter(stems, grant_id, optouts.terms(grant_id, datetime.now(timezone.utc)))
        expected = np.array([ref.may_use(int(s), grant_id) for s in stems])
        assert (got.keep == expected).all(), grant_id
        assert got.removed == int((~expected).sum())
    choices = {(r["stem"], r["scope"]): (r["opted_out"], r["position"])
               for r in await conn.fetch("SELECT * FROM patient_choices")}
    assert choices == ref.choices
    consents = {(r["stem"], r["grant_id"]): r["position"] for r in await conn.fetch("SELECT * FROM patient_consents")}
    assert consents == ref.consents
    uses = await conn.fetch("SELECT grant_id, uses FROM grants_view")
    assert {r["grant_id"]: r["uses"] for r in uses if r["uses"]} == _count(u.payload.grant_id for u in ref.uses)
    for nhs in patients:
        items, cursor = [], None
        while True:
            page = await history(conn, nhs, cursor, 3)
            items += page.items
            if page.next_cursor is None:
                break
            cursor = int(page.next_cursor)
        assert [(i.position, i.event_type) for i in items] == ref.history(int(nhs[:9]), cohorts)
    return ref


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


@pytest.mark.parametrize("seed", [1, 2])
async def test_views_filter_and_history_equal_a_reference_after_every_batch(seed, store: EventStore, pool, database):
    rng = random.Random(seed)
    patients = nhs_numbers(25, seed=seed)
    optouts = await OptOutFilter.load(pool)
    runner = make_runner(pool, database, optouts)
    supervisor = await follow_live(runner)
    ledger = Ledger(store, ProjectedOptOutAssessor(optouts, runner, wait=0.05))
    grants: list[str] = []
    cohorts: dict[str, set[int]] = {}
    counter = [0]

    def allowed(candidates, grant_id):
        keep = optouts.filter(stems_of(candidates), grant_id,
                              optouts.terms(grant_id, datetime.now(timezone.utc))).keep
        return [n for n, k in zip(candidates, keep) if k]

    try:
        for _ in range(6):
            for _ in range(rng.randint(5, 25)):
                await random_operation(rng, ledger, patients, grants, cohorts, counter, allowed)
            head, _ = await store.head()
            assert await runner.wait_for(head, 20, runner.lowest_position)
            async with pool.acquire() as conn:
                ref = await check_against_reference(conn, optouts, patients, grants, cohorts)
        assert ref.uses, "the random walk recorded no data use: the history check proved little"
    finally:
        await supervisor.stop()
        await runner.close()


async def _random_ledger(store: EventStore, patients: list[str], seed: int, steps: int) -> tuple[list, dict]:
    rng = random.Random(seed)
    ledger = Ledger(store)
    grants: list[str] = []
    cohorts: dict[str, set[int]] = {}
    for _ in range(steps):
        await random_operation(rng, ledger, patients, grants, cohorts, [len(cohorts)])
    return grants, cohorts


class Crash(Exception):
    pass


class CrashingEveryThird(Projection):
    """The projection it wraps, failing every third batch after writing its
    rows and before they commit (a process dying mid-transaction)."""

    def __init__(self, inner: Projection, calls: dict[str, int]):
        super().__init__(inner.suffix)
        self.inner, self.calls, self.name, self.tables = inner, calls, inner.name, inner.tables

    async def apply(self, conn, entries) -> None:
        await self.inner.apply(conn, entries)
        self.calls["n"] += 1
        if self.calls["n"] % 3 == 0:
            raise Crash(f"{self.name} at {entries[-1].position}")


async def test_failure_between_view_write_and_commit_neither_skips_nor_repeats(store, pool, database):
    patients = nhs_numbers(20, seed=7)
    grants, cohorts = await _random_ledger(store, patients, seed=7, steps=120)
    calls = {"n": 0}

    def crashing_runner() -> Runner:
        # A new "process" each time: nothing in memory survives a crash.
        runner = make_runner(pool, database)
        runner.projections = [CrashingEveryThird(p, calls) for p in runner.projections]
        return runner

    runner = crashing_runner()
    await runner.prepare()
    await runner.close()  # positions loaded; drive steps by hand
    crashes = 0
    while True:
        try:
            if not await runner.step():
                break
        except Crash:
            crashes += 1
            runner = crashing_runner()
            await runner.prepare()
            await runner.close()
    assert crashes >= 3
    async with pool.acquire() as conn:
        fresh = OptOutFilter()
        fresh.follow(await all_entries(conn))
        await check_against_reference(conn, fresh, patients, grants, cohorts)
        history_rows = await conn.fetchval("SELECT count(*) FROM patient_choice_history")
        ref = Reference.fold(await all_entries(conn))
        assert history_rows == sum(len(v) for v in ref.events_by_stem.values())


async def test_two_runners_racing_apply_each_event_once(store, pool, database):
    patients = nhs_numbers(15, seed=3)
    grants, cohorts = await _random_ledger(store, patients, seed=3, steps=80)
    a, b = make_runner(pool, database), make_runner(pool, database)
    import asyncio

    await asyncio.gather(a.catch_up(), b.catch_up())
    async with pool.acquire() as conn:
        fresh = OptOutFilter()
        fresh.follow(await all_entries(conn))
        await check_against_reference(conn, fresh, patients, grants, cohorts)


async def test_cancelled_mid_batch_rolls_back_and_resumes(store, pool, database):
    import asyncio

    patients = nhs_numbers(15, seed=5)
    grants, cohorts = await _random_ledger(store, patients, seed=5, steps=60)
    runner = make_runner(pool, database)
    await runner.prepare()
    await runner.close()
    entered = asyncio.Event()
    release = asyncio.Event()
    original = UsesProjection.apply

    async def slow_apply(self, conn, entries):
        await original(self, conn, entries)
        entered.set()
        await release.wait()

    UsesProjection.apply = slow_apply
    try:
        task = asyncio.create_task(runner.step())
        await asyncio.wait_for(entered.wait(), 10)
        task.cancel()  # the process dies with the view written but not committed
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        UsesProjection.apply = original
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT position FROM projection_positions WHERE name = 'uses'") in (None, 0)
    again = make_runner(pool, database)
    await again.catch_up()
    async with pool.acquire() as conn:
        fresh = OptOutFilter()
        fresh.follow(await all_entries(conn))
        await check_against_reference(conn, fresh, patients, grants, cohorts)


async def test_rebuild_gives_a_byte_identical_view(store, pool, database):
    patients = nhs_numbers(20, seed=11)
    await _random_ledger(store, patients, seed=11, steps=150)
    runner = make_runner(pool, database)
    await runner.catch_up()
    owner = await database.connect_owner()
    try:
        before = await dump_views(owner)
        assert before["patient_choice_history"] and before["grants_view"]
        for name in admin.PROJECTIONS:
            position = await admin.rebuild(owner, name, batch=13)
            assert position == (await owner.fetchval("SELECT position FROM ledger_head"))
        after = await dump_views(owner)
        assert after == before
        assert not await owner.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%__rebuild'")
        status = await admin.status(owner)
        assert all(lag == 0 for _, _, lag in status)
    finally:
        await owner.close()


async def test_service_role_cannot_change_ledger_tables_but_can_write_views(pool):
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO projection_positions VALUES ('probe', 1)")
        await conn.execute("DELETE FROM projection_positions WHERE name = 'probe'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM ledger_events")


async def test_cli_status_and_rebuild(store, pool, database, tmp_path):
    import asyncio
    import os
    import sys

    await _random_ledger(store, nhs_numbers(10, seed=17), seed=17, steps=40)
    head, _ = await store.head()
    env = {**os.environ, "DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path)}

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli.main", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await cli("projections", "status")
    assert code == 0 and f"choices\tposition=0\tlag={head}" in out
    code, out, _ = await cli("projections", "rebuild", "choices")
    assert code == 0 and f"rebuilt from position 0 to {head}" in out
    code, out, _ = await cli("projections", "status")
    assert "choices\tposition=%d\tlag=0" % head in out and f"uses\tposition=0\tlag={head}" in out
    code, _, err = await cli("projections", "rebuild", "nope")
    assert code != 0 and "no projection 'nope'" in err and len(err.strip().splitlines()) == 1


async def test_rebuild_while_the_live_runner_keeps_applying_new_events(store, pool, database):
    import asyncio

    patients = nhs_numbers(20, seed=23)
    grants, cohorts = await _random_ledger(store, patients, seed=23, steps=100)
    live = make_runner(pool, database)
    supervisor = await follow_live(live)
    rng = random.Random(24)
    ledger = Ledger(store)
    stop = asyncio.Event()

    async def keep_writing() -> None:
        counter = [1000]
        while not stop.is_set():
            await random_operation(rng, ledger, patients, grants, cohorts, counter)
            await asyncio.sleep(0)

    writing = asyncio.create_task(keep_writing())
    owner = await database.connect_owner()
    try:
        before, _ = await store.head()
        for name in admin.PROJECTIONS:
            await admin.rebuild(owner, name, batch=11)
        during, _ = await store.head()
        assert during > before, "no event was written while rebuilding: the test proved little"
        stop.set()
        await writing
        head, _ = await store.head()
        assert await live.wait_for(head, 20, live.lowest_position)
        async with pool.acquire() as conn:
            fresh = OptOutFilter()
            fresh.follow(await all_entries(conn))
            await check_against_reference(conn, fresh, patients, grants, cohorts)
        served = await dump_views(owner)
        for name in admin.PROJECTIONS:
            await admin.rebuild(owner, name)
        assert await dump_views(owner) == served
    finally:
        stop.set()
        await supervisor.stop()
        await live.close()
        await owner.close()
