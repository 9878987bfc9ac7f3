"""Against `consent-ledger serve` as a real process: a full scenario whose
logs must hold no NHS number, token or secret, and a short schemathesis run
over every operation in /openapi.json."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import aiohttp
import pytest

from conftest import AUDIENCE, ISSUER
from contracts import api
from live_server import LiveServer
from samples import VALID, WRONG_CHECK_DIGIT, auth, choice, data_use, grant, nhs_numbers

SERVICE_PASSWORD = f"pw-{uuid4().hex}"


@pytest.fixture
async def service_login(database) -> AsyncIterator[str]:
    """A separate service login with a password (deploy/POSTGRES-ROLES.md), so
    the scenario also proves the password never reaches the logs."""
    login = f"cl_live_{uuid4().hex[:8]}"
    admin = await database.connect_owner()
    await admin.execute(f"CREATE ROLE {login} LOGIN NOINHERIT PASSWORD '{SERVICE_PASSWORD}' IN ROLE consent_ledger_app")
    parts = urlsplit(database.owner_dsn)
    netloc = f"{login}:{SERVICE_PASSWORD}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    try:
        yield urlunsplit(parts._replace(netloc=netloc))
    finally:
        await admin.execute(f"DROP ROLE {login}")
        await admin.close()


@pytest.fixture
def live(database, service_login, signing_key, tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER, audience=AUDIENCE,
                        workdir=tmp_path, extra_env={"CONSENT_LEDGER_SERVICE_DATABASE_URL": service_login})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


async def _raw(server: LiveServer, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), timeout=10)
    finally:
        writer.close()


async def test_logs_of_a_full_scenario_hold_no_nhs_number_token_or_secret(live, make_token, signing_key):
    patient, other = VALID[0], VALID[1]
    cohort = nhs_numbers(20, seed=5)
    now = int(time.time())
    tokens = {
        "app": make_token("patient-app", nhs_number=patient),
        "backend": make_token("patient-app"),
        "dac": make_token("dac"),
        "sde": make_token("sde", org="SDE-NORTH"),
        "auditor": make_token("auditor"),
        "expired": make_token("auditor", iat=now - 7200, nbf=now - 7200, exp=now - 3600),
    }
    tampered = tokens["auditor"][:-6] + "AAAAAA"
    statuses: list[int] = []
    async with aiohttp.ClientSession(live.url) as http:
        async def call(method: str, path: str, token: str | None = None, headers: dict | None = None, **kw) -> int:
            headers = {**(auth(token) if token else {}), **(headers or {})}
            async with http.request(method, path, headers=headers, **kw) as r:
                await r.read()
                statuses.append(r.status)
                return r.status

        assert await call("POST", f"/v1/patients/{patient}/opt-out", tokens["app"], json=choice()) == 201
        assert await call("POST", f"/v1/patients/{patient[:3]} {patient[3:6]} {patient[6:]}/opt-out",
                          tokens["app"], json=choice()) == 200
        assert await call("POST", f"/v1/patients/{patient}/opt-in", tokens["app"], json=choice()) == 201
        assert await call("GET", f"/v1/patients/{patient}/choices", tokens["app"]) == 200
        assert await call("GET", f"/v1/patients/{other}/choices", tokens["app"]) == 403
        assert await call("POST", "/v1/grants", tokens["dac"], json=grant("G-LOG")) == 201
        assert await call("POST", f"/v1/patients/{other}/consents", tokens["backend"],
                          json={"grant_id": "G-LOG", "actor": {"kind": "patient"}}) == 201
        assert await call("DELETE", f"/v1/patients/{other}/consents/G-LOG", tokens["backend"]) == 201
        assert await call("POST", f"/v1/patients/{cohort[3]}/opt-out", tokens["backend"], json=choice()) == 201
        assert await call("POST", "/v1/data-uses", tokens["sde"],
                          json=data_use("use-log-1", "G-LOG", nhs_numbers=cohort)) == 422
        assert await call("POST", "/v1/data-uses", tokens["sde"],
                          json=data_use("use-log-2", "G-LOG", nhs_numbers=cohort[:3] + WRONG_CHECK_DIGIT)) == 422
        assert await call("POST", "/v1/data-uses", tokens["sde"],
                          json=data_use("use-log-3", "G-LOG", nhs_numbers=cohort[:3])) == 201
        for bad in WRONG_CHECK_DIGIT:
            assert await call("GET", f"/v1/patients/{bad}/choices", tokens["backend"]) == 422
        assert await call("GET", f"/v1/patientz/{patient}", tokens["backend"]) == 404
        assert await call("GET", "/v1/events?limit=1000", tokens["auditor"]) == 200
        assert await call("GET", "/v1/events", tokens["expired"]) == 401
        assert await call("GET", "/v1/events", tampered) == 401
        assert await call("GET", f"/v1/patients/{patient}/choices?token={tokens['app']}") == 401
        assert await call("POST", f"/v1/patients/{patient}/opt-out", tokens["app"],
                          data=f'{{"scope": "{patient}"}}', headers={"Content-Type": "application/json"}) in (401, 422)
    # A request aiohttp cannot parse is logged by aiohttp itself, raw bytes included.
    answer = await _raw(live, f"GET /v1/patients/{patient}/choices HTTP/1.1\r\nHost: x\r\n"
                        f"X-Patient: {patient}\x00\r\n\r\n".encode())
    assert b" 400 " in answer.split(b"\r\n")[0]
    # An over-long request line is logged raw too, percent-encoding and all.
    encoded = f"{patient[:3]}%20{patient[3:6]}%20{patient[6:]}"
    answer = await _raw(live, f"GET /v1/patients/{encoded}/choices?pad={'a' * 9000} HTTP/1.1\r\n\r\n".encode())
    assert answer.split(b"\r\n")[0].split()[1] in (b"400", b"414"), answer[:200]

    log = live.stop()
    assert '"event":"request"' in log and log.count('"event":"request"') >= len(statuses)
    assert "[nhs-number?]" in log  # the malformed request's bytes were logged, and masked
    secrets = {
        **{f"NHS number {n}": n for n in [patient, other, *cohort, *WRONG_CHECK_DIGIT]},
        f"spaced NHS number {patient}": f"{patient[:3]} {patient[3:6]} {patient[6:]}",
        f"percent-encoded NHS number {patient}": f"{patient[:3]}%20{patient[3:6]}%20{patient[6:]}",
        "service database password": SERVICE_PASSWORD,
        "signing key": signing_key.as_dict(private=True)["d"],
    }
    for name, token in {**tokens, "tampered": tampered}.items():
        header, payload, signature = token.split(".")
        secrets[f"{name} token"] = token
        secrets[f"{name} token payload"] = payload
        secrets[f"{name} token signature"] = signature
    leaked = [name for name, secret in secrets.items() if secret in log]
    assert not leaked, f"found in the logs: {leaked}"


def test_schemathesis_finds_nothing_on_any_operation(live, make_token, tmp_path: Path):
    """Short in CI (fixed seed, few examples); README shows the longer run.

    `positive_data_acceptance` is left out on purpose: a schema-valid request
    may still break a ledger rule (an unknown grant, a proxy without a role,
    an invalid date range) and be refused with a documented 422.
    """
    token = make_token(roles=list(api.ROLES), org="SDE-NORTH", subject="fuzzer")
    command = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()", "run",
        f"{live.url}/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", "8", "--seed", "2026", "--workers", "1",
        "--phases", "examples,coverage,fuzzing",
        "--request-timeout", "20", "--no-color", "--report-dir", str(tmp_path / "reports"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", result.stdout)
    assert selected, result.stdout[-3000:]
    # Every operation in the document was exercised (schemathesis skips the document's own URL).
    documented = [op for op in api.OPERATIONS if not op.page]
    assert selected[1] == selected[2] == selected[3] and int(selected[3]) >= len(documented) - 1
    log = live.stop()
    assert '"status":5' not in log, [line for line in log.splitlines() if '"status":5' in line][:5]


async def test_configuration_reaches_the_running_service(database, signing_key, make_token, tmp_path: Path):
    """CONSENT_LEDGER_FILTER_WAIT, _PROJECTION_POLL and _TOKEN_MAX_LIFETIME_SECONDS
    set in the environment of `consent-ledger serve` are the ones it uses."""
    server = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER, audience=AUDIENCE,
                        workdir=tmp_path, extra_env={"CONSENT_LEDGER_FILTER_WAIT": "0.2",
                                                     "CONSENT_LEDGER_PROJECTION_POLL": "0.3",
                                                     "CONSENT_LEDGER_TOKEN_MAX_LIFETIME_SECONDS": "900"})
    try:
        server.wait_ready()
        now = int(time.time())
        short = make_token("sde", org="SDE-NORTH", exp=now + 600)
        long_lived = make_token("sde", org="SDE-NORTH", exp=now + 3600)
        century = make_token("sde", org="SDE-NORTH", iat=now, exp=now + 100 * 365 * 86400)
        async with aiohttp.ClientSession(server.url) as http:
            async with http.post("/v1/opt-out-filter?min_position=1000000", json={"nhs_numbers": []},
                                 headers=auth(short)) as r:
                assert r.status == 503 and "after waiting 0.2 s" in (await r.json())["detail"]
            for token in (long_lived, century):
                async with http.post("/v1/opt-out-filter", json={"nhs_numbers": []}, headers=auth(token)) as r:
                    assert r.status == 401 and "longer than the 900 s" in (await r.json())["detail"]
    finally:
        log = server.stop()
    loaded = [line for line in log.splitlines() if "decision state loaded" in line]
    assert loaded and '"projection_poll_interval":0.3' in loaded[0] and '"filter_wait":0.2' in loaded[0], loaded
