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

import aiohttp
from conftest import AUDIENCE, ISSUER, TokenFactory
from joserfc.jwk import OKPKey
from live_server import free_port, wait_until_ready
from samples import auth, choice, nhs_numbers

from service.audit import verify_database
from service.database import Database


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
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2"],
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
