"""`consent-ledger serve --workers 2`: two processes share the port and each
runs its own batching writer; the chain-head lock must keep the log gap-free
and correctly chained, and Ctrl-C must stop them all cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
from conftest import AUDIENCE, ISSUER, TokenFactory
from joserfc.jwk import OKPKey
from live_server import free_port, wait_until_ready
from samples import auth, choice, nhs_numbers

from service.audit.chain import verify_database
from service.store.database import Database


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "python" in line]


async def test_two_workers_share_the_port_and_keep_one_chain(
    database: Database, signing_key: OKPKey, make_token: TokenFactory, tmp_path
):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [signing_key.as_dict(private=False)]}))
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_JWKS": str(jwks),
           "CONSENT_LEDGER_JWT_ISSUER": ISSUER, "CONSENT_LEDGER_JWT_AUDIENCE": AUDIENCE,
           "CONSENT_LEDGER_DATA_DIR": str(tmp_path), "CONSENT_LEDGER_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli.main", "serve", "--port", str(port), "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_ready(session, base, proc)
        assert len(_children(proc.pid)) >= 2
        token = make_token("patient-app")
        patients = nhs_numbers(60, seed=7)
        # A new connection per request, so the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async def opt_out(nhs: str) -> tuple[int, dict]:
                async with session.post(f"{base}/v1/patients/{nhs}/opt-out", json=choice(),
                                        headers=auth(token)) as r:
                    return r.status, await r.json()

            results = await asyncio.gather(*(opt_out(n) for n in patients))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, stderr[-2000:]
    assert [s for s, _ in results] == [201] * len(patients)
    positions = sorted(body["position"] for _, body in results)
    assert positions == list(range(1, len(patients) + 1))
    conn = await database.connect_owner()
    try:
        verified = await verify_database(conn)
    finally:
        await conn.close()
    assert verified.failure is None and verified.size == len(patients)


def _workers(pid: int) -> list[int]:
    """The worker processes of a `serve` (not multiprocessing's resource tracker)."""
    def command(child: int) -> bytes:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""
    return [c for c in _children(pid) if b"--multiprocessing-fork" in command(c)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (it holds no port).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_workers_follow_their_parent_and_a_restart_finds_none_left(database: Database, signing_key: OKPKey,
                                                                          tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [signing_key.as_dict(private=False)]}))
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_JWKS": str(jwks),
           "CONSENT_LEDGER_JWT_ISSUER": ISSUER, "CONSENT_LEDGER_JWT_AUDIENCE": AUDIENCE,
           "CONSENT_LEDGER_DATA_DIR": str(tmp_path), "CONSENT_LEDGER_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service.cli.main", "serve", "--port", str(port), "--workers", "2"]
    base = f"http://127.0.0.1:{port}"
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = None
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_ready(session, base, first)
        old_workers = _workers(first.pid)
        assert len(old_workers) == 2
        first.kill()  # SIGKILL: the parent cannot tell its workers anything
        first.wait()
        # Restarted at once: it waits for the old workers to go, then serves with its own.
        second = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        async with aiohttp.ClientSession() as session:
            await wait_until_ready(session, base, second)
        # They stop on their own (their parent is gone); on a busy machine the
        # last of them may still be finishing its shutdown when the port is free.
        deadline = time.monotonic() + 30
        while [pid for pid in old_workers if _alive(pid)] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not [pid for pid in old_workers if _alive(pid)], "workers outlived their parent"
        # An old worker may have answered the readiness check above: wait for the new ones.
        while len(_workers(second.pid)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            await wait_until_ready(session, base, second)
        new_workers = _workers(second.pid)
        assert len(new_workers) == 2 and not set(new_workers) & set(old_workers)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, second.stderr.read().decode()[-2000:] if second.stderr else ""
        assert not [pid for pid in new_workers if _alive(pid)], "a clean stop left a worker behind"
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
