"""Database faults under a write load, against `consent-ledger serve` as a real
process and a PostgreSQL cluster of the test's own: a fast restart, a
``kill -9`` of the postmaster, and backends terminated again and again.

After each fault: no 500, every 503 carries Retry-After, /readyz said 503
while the database was down (and /metrics kept answering, reporting it
down), the checkpoint signer is alive and checkpoints catch up to the head.
At the end every acknowledged write is in the log exactly once with the
receipt it was given, and `consent-ledger verify` accepts the whole chain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from conftest import AUDIENCE, ISSUER
from live_server import LiveServer
from private_postgres import PrivateCluster
from samples import auth, choice, nhs_numbers

DATABASE = "ledger"
WRITERS = 6


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    c = PrivateCluster()
    try:
        c.start()
        yield c
    finally:
        c.remove()


@pytest.fixture
async def server(cluster: PrivateCluster, signing_key, tmp_path: Path) -> AsyncIterator[LiveServer]:
    conn = await asyncpg.connect(cluster.dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    live = LiveServer(database_url=cluster.database_url(DATABASE), signing_key=signing_key, issuer=ISSUER,
                      audience=AUDIENCE, workdir=tmp_path, extra_env={
                          "CONSENT_LEDGER_LOG_LEVEL": "info",
                          "CONSENT_LEDGER_CHECKPOINT_INTERVAL": "0.2",
                          "CONSENT_LEDGER_PROJECTION_POLL": "0.2",
                          "CONSENT_LEDGER_TASK_STALL_SECONDS": "3",
                          "CONSENT_LEDGER_REQUEST_TIMEOUT_SECONDS": "10",
                      })
    try:
        live.wait_ready()
        yield live
    finally:
        if live.process.poll() is None:
            live.stop()


class Load:
    """Writers that each opt a new patient out, retrying a refused write with
    the same Idempotency-Key until it is acknowledged; every answer is kept."""

    def __init__(self, session: aiohttp.ClientSession, token: str):
        self.session, self.token = session, token
        self.patients = iter(nhs_numbers(50_000, seed=1010))  # more than the writers can use in the test
        self.receipts: dict[str, dict] = {}  # Idempotency-Key -> acknowledged receipt
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []
        self.stopping = asyncio.Event()

    async def writer(self, n: int) -> None:
        count = 0
        while not self.stopping.is_set():
            nhs, key = next(self.patients), f"w{n}-{count}"
            count += 1
            while True:  # until acknowledged, also after `stopping`: no write is left unknown
                status, headers, body = await self.post(nhs, key)
                self.statuses[status] += 1
                if status in (200, 201):
                    self.receipts[key] = body
                    break
                if status != 503 or "Retry-After" not in headers:
                    self.problems.append(f"{status} without a usable answer: {body}")
                    break
                await asyncio.sleep(0.05)

    async def post(self, nhs: str, key: str) -> tuple[int, dict, dict]:
        try:
            async with self.session.post(f"/v1/patients/{nhs}/opt-out", json=choice(),
                                         headers=auth(self.token, **{"Idempotency-Key": key})) as r:
                return r.status, dict(r.headers), await r.json(content_type=None)
        except aiohttp.ClientError as exc:
            self.problems.append(f"connection to the service failed: {exc!r}")
            return 0, {}, {}

    def problems_so_far(self) -> list[str]:
        return self.problems + [f"{n} answers of 500" for s, n in self.statuses.items() if s >= 500 and s != 503]


async def get(session: aiohttp.ClientSession, path: str) -> tuple[int, dict, str]:
    async with session.get(path) as r:
        return r.status, dict(r.headers), await r.text()


async def while_down(session: aiohttp.ClientSession, seconds: float) -> list[str]:
    """What /readyz and /metrics answer while the database is down: lies, if any."""
    lies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, headers, body = await get(session, "/readyz")
        if status != 503 or "Retry-After" not in headers:
            lies.append(f"/readyz answered {status} {body} while the database was down")
        status, _, body = await get(session, "/metrics")
        if status != 200 or "consent_ledger_database_up 0.0" not in body:
            lies.append(f"/metrics answered {status} without database_up 0 while the database was down")
        await asyncio.sleep(0.1)
    return lies


async def recovered(session: aiohttp.ClientSession, seconds: float = 30.0) -> int:
    """Wait for /readyz 200 and a signed checkpoint covering the head it reported."""
    deadline = time.monotonic() + seconds
    while True:
        status, _, body = await get(session, "/readyz")
        if status == 200:
            head = json.loads(body)["position"]
            break
        assert time.monotonic() < deadline, f"not ready {seconds:.0f} s after the fault: {body}"
        await asyncio.sleep(0.1)
    while True:
        _, _, note = await get(session, "/checkpoint")
        size = int(note.splitlines()[1])
        if size >= head:
            return size
        assert time.monotonic() < deadline, f"checkpoints stuck at {size} while the head is {head}: signer dead?"
        await asyncio.sleep(0.1)


async def test_database_faults_under_load(cluster: PrivateCluster, server: LiveServer, make_token):
    lies: list[str] = []
    async with aiohttp.ClientSession(server.url) as session:
        load = Load(session, make_token("patient-app"))
        writers = [asyncio.create_task(load.writer(n)) for n in range(WRITERS)]
        try:
            await asyncio.sleep(1.0)

            for fault in ("fast restart", "kill -9 of the postmaster"):
                before = len(load.receipts)
                if fault == "fast restart":
                    await asyncio.to_thread(cluster.stop, "fast")
                else:
                    await asyncio.to_thread(cluster.kill_postmaster)
                lies += await while_down(session, 1.0)
                await asyncio.to_thread(cluster.start)
                await recovered(session)
                await asyncio.sleep(0.5)
                assert len(load.receipts) > before, f"no write was acknowledged around the {fault}"
                assert not load.problems_so_far(), f"after the {fault}: {load.problems_so_far()[:5]}"

            before = len(load.receipts)
            terminated = 0
            for _ in range(8):
                terminated += await cluster.terminate_backends(DATABASE)
                await asyncio.sleep(0.15)
            assert terminated >= 8, "pg_terminate_backend found (almost) no backends: the fault did not happen"
            await recovered(session)
            assert len(load.receipts) > before

            load.stopping.set()
            await asyncio.gather(*writers)
            assert not load.problems_so_far(), load.problems_so_far()[:5]
            assert not lies, lies[:5]
            assert load.statuses[503] > 0, "no write ever saw the database down: the faults proved little"
        finally:
            for w in writers:
                w.cancel()
        size = await recovered(session)

        # The signer ran through all of it: no stall left, restarts visible.
        _, _, metrics = await get(session, "/metrics")
        assert 'consent_ledger_task_stalled{task="checkpoint-signer"} 0.0' in metrics
        async with session.get("/v1/log-key") as r:
            vkey = (await r.json())["keys"][0]

    # Every acknowledged write is in the log once, with the receipt it was given.
    conn = await asyncpg.connect(cluster.database_url(DATABASE))
    try:
        rows = await conn.fetch("SELECT position, event_id, leaf_hash FROM ledger_events"
                                " WHERE event_type = 'OptOutRegistered' ORDER BY position")
    finally:
        await conn.close()
    stored = {r["position"]: (str(r["event_id"]), bytes(r["leaf_hash"]).hex()) for r in rows}
    acknowledged = {r["position"]: (r["event_id"], r["leaf_hash"]) for r in load.receipts.values()}
    assert acknowledged == stored, "acknowledged writes and the log disagree (lost, changed or duplicated)"
    assert size >= max(stored)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli.main", "verify", "--url", server.url, "--key", vkey,
        env={**os.environ, "CONSENT_LEDGER_TOKEN": make_token("auditor")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()

    # A clean stop exits 0 although tasks failed and restarted during the faults.
    server.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server.process.wait, 30)
    log = server.stop()
    assert code == 0, log[-3000:]
    assert "unhandled error" not in log
    failures = [json.loads(line) for line in log.splitlines()
                if line.startswith("{") and "background task failed" in line]
    assert all(f.get("task") for f in failures), "a task failure was logged without the task's name"


async def test_a_write_whose_commit_was_cut_off_says_it_may_have_landed(client, database, make_token):
    """The connection dies while COMMIT runs: the writer cannot know whether
    the write committed, and says so; a retry with the same key settles it."""
    owner = await database.connect_owner()
    try:
        await owner.execute("""
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
              $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON ledger_head
              DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();""")
        token, nhs = make_token("patient-app"), nhs_numbers(1, seed=77)[0]
        headers = auth(token, **{"Idempotency-Key": "cut-off-1"})
        posting = asyncio.create_task(client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=headers))
        deadline = time.monotonic() + 10
        while not (pids := await owner.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'")):
            assert time.monotonic() < deadline, "the write never reached its COMMIT"
            await asyncio.sleep(0.02)
        await owner.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
        r = await posting
        problem = await r.json()
        assert r.status == 503 and r.headers["Retry-After"]
        assert problem["type"].endswith("outcome-unknown") and "same Idempotency-Key" in problem["detail"]
        await owner.execute("DROP TRIGGER slow_commit ON ledger_head")
        retry = await client.post(f"/v1/patients/{nhs}/opt-out", json=choice(), headers=headers)
        assert retry.status in (200, 201)
        written = await owner.fetch("SELECT position FROM ledger_events WHERE event_type = 'OptOutRegistered'")
        assert [r["position"] for r in written] == [(await retry.json())["position"]]
    finally:
        await owner.close()
