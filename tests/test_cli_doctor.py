"""`consent-ledger doctor` as a newcomer runs it, against a real server on
loopback: what it finds, in plain words, and its exit status."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AUDIENCE, ISSUER
from live_server import LiveServer, free_port


def doctor(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_") and k != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "service.cli.main", "doctor", *args], env={**clean, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def findings(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return {line.split(":", 1)[0][6:]: line for line in result.stdout.splitlines()}


@pytest.fixture
def server(database, signing_key, tmp_path):
    live = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER, audience=AUDIENCE,
                      workdir=tmp_path)
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()



async def test_a_good_setup_is_all_ok_with_the_tokens_expiry(server, database, tmp_path, make_token):
    env = {"DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path / "data"),
           "CONSENT_LEDGER_JWKS": str(tmp_path / "jwks.json"),
           "CONSENT_LEDGER_TOKEN": make_token("auditor", org="NDG", exp=int(time.time()) + 1800)}
    (tmp_path / "data").mkdir(exist_ok=True)
    result = await asyncio.to_thread(doctor, "--url", server.url, env=env)
    found = findings(result)
    assert result.returncode == 0, result.stdout
    assert all(line.startswith(("ok ", "note ")) for line in found.values()), result.stdout
    assert f"JWKS file {tmp_path / 'jwks.json'}" in found["token keys"]
    assert "reachable, ledger head at position" in found["database"]
    assert f"{server.url} is ready" in found["server"]
    token = found["token"]
    assert f"valid for {server.url}, until " in token and "min left" in token, token
    assert "'test-auditor'" in token and "roles auditor" in token and "organisation NDG" in token
    assert result.stderr == ""


async def test_a_token_the_server_refuses_is_a_failure_with_the_servers_reason(server, database, tmp_path,
                                                                               make_token):
    stale = make_token("auditor", exp=int(time.time()) - 3600)
    result = await asyncio.to_thread(doctor, "--url", server.url, "--token", stale,
                                     env={"DATABASE_URL": database.owner_dsn,
                                          "CONSENT_LEDGER_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 1
    assert findings(result)["token"].startswith("FAIL  token: ") and "expired" in findings(result)["token"]


def test_a_newcomer_in_the_wrong_folder_is_told_what_is_missing(tmp_path):
    """No data directory here, no server at the URL, no token: each is said in
    plain words with what to do, and nothing is created."""
    url = f"http://127.0.0.1:{free_port()}"
    result = doctor("--url", url, env={}, cwd=tmp_path)
    found = findings(result)
    assert result.returncode == 1
    assert found["data directory"].startswith("FAIL") and "consent-ledger serve" in found["data directory"]
    assert found["server"].startswith("FAIL") and "connection refused" in found["server"]
    assert "consent-ledger serve" in found["server"]
    assert found["database"].startswith("note") and "not created yet" in found["database"]
    assert list(tmp_path.iterdir()) == []  # doctor changes nothing


def test_an_unreachable_database_url_fails_saying_so(tmp_path):
    result = doctor("--url", f"http://127.0.0.1:{free_port()}",
                    env={"DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/none",
                         "CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    line = findings(result)["database"]
    assert line.startswith("FAIL") and "postgresql://127.0.0.1:1/none" in line and "connection refused" in line
    assert "secret" not in result.stdout
