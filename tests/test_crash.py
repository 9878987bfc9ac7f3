"""Crash safety: SIGKILL the serving process while clients are writing.

After a restart the chain must verify end to end, every receipt a client
was given must be in the log exactly as given, and retrying the requests
whose answers were lost (same Idempotency-Key) must not record anything twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import AUDIENCE, ISSUER
from joserfc.jwk import OKPKey
from live_server import free_port, wait_until_ready
from samples import auth, choice, nhs_numbers

from service.audit.chain import verify_database
from service.store.database import Database

CLIENTS = 8
KILL_AFTER_RECEIPTS = 150
MAX_REQUESTS_PER_CLIENT = 400



def _command() -> list[str]:
    script = Path(sys.executable).parent / "consent-ledger"
    if script.exists():
        return [str(script)]
    found = shutil.which("consent-ledger")
    return [found] if found else [sys.executable, "-m", "service.cli.main"]


class Server:
    def __init__(self, database: Database, workdir: Path, jwks: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": database.owner_dsn,
            "CONSENT_LEDGER_JWKS": str(jwks),
            "CONSENT_LEDGER_JWT_ISSUER": ISSUER,
            "CONSENT_LEDGER_JWT_AUDIENCE": AUDIENCE,
            "CONSENT_LEDGER_DATA_DIR": str(workdir / "data"),
            "CONSENT_LEDGER_LOG_LEVEL": "info",
        }
        self.log = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        await wait_until_ready(session, self.url, self.process, log=self.log)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


@pytest.fixture
def jwks(tmp_path: Path, signing_key: OKPKey) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [signing_key.as_dict(private=False)]}))
    return path


async def test_sigkill_mid_stream_loses_no_receipt(database, tmp_path, jwks, make_token):
    server = Server(database, tmp_path, jwks)
    token = make_token("patient-app")
    patients = nhs_numbers(CLIENTS * MAX_REQUESTS_PER_CLIENT, seed=11)
    receipts: dict[str, dict] = {}  # NHS number -> receipt the client was given
    unanswered: list[str] = []  # sent, but the answer was lost in the crash
    enough = asyncio.Event()

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        for nhs in patients[index::CLIENTS][:MAX_REQUESTS_PER_CLIENT]:
            try:
                async with session.post(f"{server.url}/v1/patients/{nhs}/opt-out", json=choice(),
                                        headers=auth(token, **{"Idempotency-Key": f"crash-{nhs}"})) as r:
                    assert r.status == 201, await r.text()
                    receipts[nhs] = await r.json()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                unanswered.append(nhs)
                return
            if len(receipts) >= KILL_AFTER_RECEIPTS:
                enough.set()

    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await server.start(session)
            clients = [asyncio.create_task(client(session, i)) for i in range(CLIENTS)]
            await asyncio.wait_for(enough.wait(), timeout=120)
            server.kill()
            await asyncio.gather(*clients)
        print(f"before kill: {len(receipts)} receipts, {len(unanswered)} unanswered")
        assert len(receipts) >= KILL_AFTER_RECEIPTS
        assert unanswered, "the kill did not interrupt any client"

        async with aiohttp.ClientSession(timeout=timeout) as session:
            await server.start(session)
            # Retrying a request whose answer was lost gives its receipt
            # (if it had committed) or records it now: never twice.
            for nhs in unanswered:
                async with session.post(f"{server.url}/v1/patients/{nhs}/opt-out", json=choice(),
                                        headers=auth(token, **{"Idempotency-Key": f"crash-{nhs}"})) as r:
                    assert r.status in (200, 201), await r.text()
                    receipts[nhs] = await r.json()
            async with session.get(f"{server.url}/readyz") as r:
                head = (await r.json())["position"]
    finally:
        server.stop()

    conn = await database.connect_owner()
    try:
        verified = await verify_database(conn)
        rows = await conn.fetch("SELECT position, event_id, leaf_hash, chain_hash, recorded_at FROM ledger_events")
        per_patient = await conn.fetch(
            "SELECT convert_from(entry, 'UTF8')::jsonb->'payload'->>'nhs_number' AS nhs, count(*) AS n"
            " FROM ledger_events GROUP BY 1 HAVING count(*) > 1")
    finally:
        await conn.close()
    assert verified.failure is None, str(verified.failure)
    assert verified.size == head == len(rows)
    assert not per_patient, "a retried opt-out was recorded twice"
    by_position = {r["position"]: r for r in rows}
    for nhs, receipt in receipts.items():
        row = by_position.get(receipt["position"])
        assert row is not None, f"receipt at position {receipt['position']} is missing after the crash"
        assert str(row["event_id"]) == receipt["event_id"]
        assert bytes(row["leaf_hash"]).hex() == receipt["leaf_hash"]
        assert bytes(row["chain_hash"]).hex() == receipt["chain_hash"]
    assert len({r["position"] for r in receipts.values()}) == len(receipts)
    # Request logs name the route template, never the patient in the path.
    log = server.log.read_text()
    assert '"route":"/v1/patients/{nhs}/opt-out"' in log
    leaked = [nhs for nhs in receipts if nhs in log]
    assert not leaked, f"{len(leaked)} NHS numbers appear in the server log"
