"""The command line as a user runs it: real subprocesses, real PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from joserfc import jwt
from joserfc.jwk import OKPKey

from conftest import _dsn_with_database
from service.audit import verify_database
from service.auth import DEV_KEY_FILE


def _command() -> list[str]:
    script = Path(sys.executable).parent / "consent-ledger"
    if script.exists():
        return [str(script)]
    found = shutil.which("consent-ledger")
    return [found] if found else [sys.executable, "-m", "service.cli"]


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_") and k != "DATABASE_URL"}
    return subprocess.run([*_command(), *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_reason(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("consent-ledger: "), lines
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
async def empty_dsn(admin_dsn: str):
    name = f"cl_cli_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _dsn_with_database(admin_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrate_creates_the_schema_once(empty_dsn, tmp_path):
    env = {"DATABASE_URL": empty_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path)}
    first = run("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "migrations applied: [1" in first.stdout
    again = run("migrate", env=env)
    assert again.returncode == 0 and "up to date" in again.stdout, again
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT position FROM ledger_head") == 0
    finally:
        await conn.close()


def test_migrate_against_an_unreachable_server_fails_in_one_line(tmp_path):
    result = run("migrate", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                                 "CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    one_line_reason(result)


def test_token_issue_signs_with_the_dev_key_in_the_data_dir(tmp_path):
    result = run("token", "issue", "--role", "sde", "--org", "SDE-NORTH", "--lifetime", "120",
                 env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    key = OKPKey.import_key(json.loads((tmp_path / DEV_KEY_FILE).read_text()))
    public = OKPKey.import_key(key.as_dict(private=False))
    claims = jwt.decode(token, public, algorithms=["EdDSA"]).claims
    assert claims["roles"] == ["sde"] and claims["org"] == "SDE-NORTH"
    assert claims["iss"] == "consent-ledger-dev" and claims["aud"] == "consent-ledger"
    assert claims["exp"] - claims["iat"] == 120
    # A token from another data directory's key does not verify with this one.
    other = run("token", "issue", "--role", "sde", env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path / "other")})
    with pytest.raises(Exception):
        jwt.decode(other.stdout.strip().splitlines()[-1], public, algorithms=["EdDSA"])


@pytest.mark.parametrize(("args", "env", "reason"), [
    (["token", "issue", "--role", "sde"], {"CONSENT_LEDGER_JWKS": "/nonexistent/jwks.json"}, "CONSENT_LEDGER_JWKS"),
    (["token", "issue", "--role", "sde"], {"CONSENT_LEDGER_ENV": "production"}, "production"),
    (["token", "issue", "--role", "patient-app", "--nhs-number", "9434765918"], {}, "check digit"),
])
def test_bad_input_exits_non_zero_with_one_line(tmp_path, args, env, reason):
    line = one_line_reason(run(*args, env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path), **env}))
    assert reason in line
    assert not (tmp_path / DEV_KEY_FILE).exists() or "nhs" in " ".join(args)


def test_unknown_role_is_refused(tmp_path):
    result = run("token", "issue", "--role", "root", env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    assert result.returncode != 0 and "invalid choice" in result.stderr


async def test_demo_can_run_again_on_the_same_data(database, tmp_path):
    env = {"DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path),
           "CONSENT_LEDGER_LOG_LEVEL": "warning"}
    first = run("demo", "--patients", "300", env=env)
    assert first.returncode == 0, first.stderr
    assert "demo loaded: 300 patients" in first.stdout and "already recorded" not in first.stdout
    conn = await database.connect_owner()
    try:
        head = await conn.fetchval("SELECT position FROM ledger_head")
        again = run("demo", "--patients", "300", env=env)
        assert again.returncode == 0, again.stderr
        assert "already recorded before this run" in again.stdout, again.stdout
        assert "3 grants" in again.stdout and "12 data uses" in again.stdout.split("already")[1]
        # Everything already existed, so the second run wrote nothing.
        assert await conn.fetchval("SELECT position FROM ledger_head") == head
        verified = await verify_database(conn)
        assert verified.failure is None and verified.size == head
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(empty_dsn, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_") and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": empty_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    processes = [subprocess.Popen([*_command(), "migrate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, stdin=subprocess.DEVNULL) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert sorted("up to date" in out for out, _ in outputs) == [False, True], outputs


def test_token_issue_outside_the_servers_folder_refuses_instead_of_making_a_key(tmp_path):
    """Run where no data directory exists (the default ./.consent-ledger of
    another folder), it used to create a new key there silently, and every
    token it printed was then refused by the server."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
    result = subprocess.run([*_command(), "token", "issue", "--role", "auditor"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    line = one_line_reason(result)
    assert str(elsewhere / ".consent-ledger") in line and "CONSENT_LEDGER_DATA_DIR" in line
    assert "consent-ledger serve" in line
    assert list(elsewhere.iterdir()) == []


def test_token_issue_names_the_key_it_signed_with(tmp_path):
    first = run("token", "issue", "--role", "sde", env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    assert "NEW development key" in first.stderr and str(tmp_path / DEV_KEY_FILE) in first.stderr
    again = run("token", "issue", "--role", "sde", env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    assert "NEW" not in again.stderr and str(tmp_path / DEV_KEY_FILE) in again.stderr


@pytest.mark.parametrize("lifetime", ["-120", "0", "ten", "99999999"])
def test_token_lifetime_must_be_a_sensible_number_of_seconds(tmp_path, lifetime):
    line = one_line_reason(run("token", "issue", "--role", "sde", "--lifetime", lifetime,
                               env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path)}))
    assert "--lifetime" in line and "token issue --help" in line
    assert not (tmp_path / DEV_KEY_FILE).exists()


def test_usage_mistakes_are_one_line_and_help_lists_the_exit_statuses(tmp_path):
    env = {"CONSENT_LEDGER_DATA_DIR": str(tmp_path)}
    line = one_line_reason(run("serv", env=env))
    assert "invalid choice: 'serv'" in line and "consent-ledger --help" in line
    line = one_line_reason(run("verify", "--key", "k", env=env))
    assert "--url" in line and "--export" in line
    shown = run("--help", env=env)
    assert shown.returncode == 0
    statuses = shown.stdout.split("exit status:")[1]
    for code in ("0", "1", "2", "3", "130"):
        assert f"\n  {code} " in statuses, statuses


def test_an_unreachable_database_says_where_and_what_to_do(tmp_path):
    result = run("migrate", env={"DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/none",
                                 "CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    line = one_line_reason(result)
    assert result.returncode == 2
    assert "postgresql://127.0.0.1:1/none" in line and "connection refused" in line and "DATABASE_URL" in line
    assert "secret" not in line and "Error" not in line  # no password, no exception class
    debug = run("migrate", "--debug", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                                           "CONSENT_LEDGER_DATA_DIR": str(tmp_path)})
    assert "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1] == line
