"""Stateless instances (issue 17, part B): any number of `serve` processes on
one database, exactly one of which applies the projections, signs checkpoints
and delivers notifications; when it is killed another takes over within the
lease time, with no entry applied twice or skipped."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from conftest import AUDIENCE, ISSUER
from live_server import LiveServer
from samples import auth, choice, nhs_numbers

from contracts import note
from service.audit import client as auditor
from service.store.checkpoints import write_key
from service.store.leases import lock_key

LEASE = 0.5


def _serve(database, signing_key, workdir: Path) -> LiveServer:
    workdir.mkdir()
    key = workdir.parent / "log.key"  # every instance signs with the log's one key
    if not key.exists():
        write_key(key, note.Signer.generate("consent-ledger.example/log"))
    server = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER, audience=AUDIENCE,
                        workdir=workdir, extra_env={"CONSENT_LEDGER_LEASE_SECONDS": str(LEASE),
                                                    "CONSENT_LEDGER_PROJECTION_POLL": "0.1",
                                                    "CONSENT_LEDGER_CHECKPOINT_INTERVAL": "0.2",
                                                    "CONSENT_LEDGER_LOG_LEVEL": "info",
                                                    "CONSENT_LEDGER_LOG_KEY": str(key)})
    server.wait_ready()
    return server


async def _writer(session: aiohttp.ClientSession, server: LiveServer) -> bool:
    async with session.get(f"{server.url}/readyz") as r:
        return (await r.json()).get("writer") is True


async def _leader(session: aiohttp.ClientSession, servers: list[LiveServer], seconds: float = 20) -> LiveServer:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        leading = [s for s in servers if await _writer(session, s)]
        assert len(leading) <= 1, "two processes hold the writer lease at once"
        if leading:
            return leading[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no process took the writer lease")


async def _opt_out(session, server: LiveServer, token: str, patients: list[str]) -> int:
    position = 0
    for nhs in patients:
        async with session.post(f"{server.url}/v1/patients/{nhs}/opt-out", json=choice(), headers=auth(token)) as r:
            assert r.status == 201, await r.text()
            position = (await r.json())["position"]
    return position


async def _applied(database, position: int, seconds: float = 30) -> None:
    conn = await database.connect_owner()
    try:
        for _ in range(int(seconds * 20)):
            reached = await conn.fetchval("SELECT min(position) FROM projection_positions")
            signed = await conn.fetchval("SELECT max(tree_size) FROM checkpoints")
            if reached >= position and signed >= position:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"projections at {reached}, checkpoints at {signed}: not {position} after {seconds} s")
    finally:
        await conn.close()


async def test_one_writer_among_instances_and_a_take_over_when_it_is_killed(database, signing_key, make_token,
                                                                           tmp_path: Path):
    servers = [_serve(database, signing_key, tmp_path / name) for name in ("a", "b")]
    token = make_token("patient-app")
    patients = nhs_numbers(40, seed=81)
    try:
        async with aiohttp.ClientSession() as session:
            leader = await _leader(session, servers)
            standby = next(s for s in servers if s is not leader)
            # Writes go to any instance; the leader alone applies them to the projections.
            position = await _opt_out(session, standby, token, patients[:20])
            await _applied(database, position)

            leader.process.send_signal(signal.SIGKILL)
            leader.process.wait()
            killed = time.monotonic()
            assert await _leader(session, [standby]) is standby
            took_over = time.monotonic() - killed
            position = await _opt_out(session, standby, token, patients[20:])
            await _applied(database, position)
    finally:
        for s in servers:
            s.stop()
    assert took_over < 5 * LEASE + 5, f"take-over took {took_over:.1f} s"

    # Nothing applied twice or skipped: the views say exactly what the log says, and the log verifies.
    conn = await database.connect_owner()
    try:
        assert await conn.fetchval("SELECT count(*) FROM patient_choices WHERE opted_out") == 40
        assert await conn.fetchval("SELECT count(*) FROM patient_choice_history WHERE event_type = "
                                   "'OptOutRegistered'") == 40
    finally:
        await conn.close()
    survivor = _serve(database, signing_key, tmp_path / "c")
    try:
        source = auditor.HttpSource(survivor.url, make_token("auditor"))
        keys = [note.parse_vkey(k) for k in await _log_keys(survivor)]
        outcome = await asyncio.to_thread(auditor.verify, source, keys)
        assert outcome.ok, outcome.report()
    finally:
        survivor.stop()


async def _log_keys(server: LiveServer) -> list[str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/v1/log-key") as r:
            return (await r.json())["keys"]


async def test_a_lease_is_held_by_one_session_and_freed_when_it_ends(database):
    key = lock_key("writer")
    first, second = await database.connect_owner(), await database.connect_owner()
    try:
        assert await first.fetchval("SELECT pg_try_advisory_lock($1)", key)
        assert not await second.fetchval("SELECT pg_try_advisory_lock($1)", key)
        first.terminate()  # the holder's session ends (a killed process)
        for _ in range(100):
            if await second.fetchval("SELECT pg_try_advisory_lock($1)", key):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the lock was not freed when its session ended")
    finally:
        await second.close()
        first.terminate()
