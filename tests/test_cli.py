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
from service.audit.chain import verify_database
from service.auth.tokens import DEV_KEY_FILE


def _command() -> list[str]:
    script = Path(sys.executable).parent / "consent-ledger"
    if script.exists():
        return [str(script)]
    found = shutil.which("consent-ledger")
    return [found] if found else [sys.executable, "-m", "service.cli.main"]


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


async def _opt_out_as_someone_else(database, numbers) -> None:
    from contracts.bodies import ChoiceRequest
    from contracts.values import Actor
    from service.app.caller import Caller
    from service.app.ledger import Ledger
    from service.store.event_store import EventStore

    pool = await database.create_pool(min_size=1, max_size=2)
    store = EventStore(pool)
    store.start()
    try:
        app = Caller(subject="someone-else", roles=frozenset({"patient-app"}))
        for nhs in numbers:
            await Ledger(store).choose(app, nhs, True, ChoiceRequest(scope="national", channel="app",
                                                                      actor=Actor(kind="patient")), None)
    finally:
        await store.stop()
        await pool.close()


async def test_demo_honours_other_writes_and_can_run_again(database, tmp_path):
    """The demo used to filter cohorts by its own opt-outs only, so opt-outs
    written by anyone else (before it, or between two runs) made it fail
    with 'RuleBroken: 1 patient(s) ... POST /v1/opt-out-filter'.  It now
    filters each cohort as an SDE would, through the filter at the head."""
    import random

    from service.cli.demo import _patients

    people = _patients(300, random.Random(2021))  # the demo's own draw for its default seed
    await _opt_out_as_someone_else(database, people[::10])
    env = {"DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path),
           "CONSENT_LEDGER_LOG_LEVEL": "warning"}
    first = run("demo", "--patients", "300", env=env)
    assert first.returncode == 0, first.stderr
    assert "demo loaded: 300 patients" in first.stdout and "12 data uses" in first.stdout
    await _opt_out_as_someone_else(database, people[5::10])
    conn = await database.connect_owner()
    try:
        uses = [json.loads(r[0])["payload"] for r in await conn.fetch(
            "SELECT entry FROM ledger_events WHERE event_type = 'DataUseRecorded'")]
        assert len(uses) == 12 and all(u["opted_out_included"] == u["consented_included"]
                                       for u in uses if u.get("exemption_applied") is None)
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


def test_demo_refuses_more_patients_than_the_test_range_holds(tmp_path):
    """--patients 1000000 used to spin for ever at 80 % CPU: only 909,091
    test-range numbers have a valid check digit."""
    from service.cli.demo import MAX_PATIENTS, demo_range_stems

    assert MAX_PATIENTS == len(demo_range_stems()) == 909_091
    for count in ("1000000", "0"):
        result = run("demo", "--patients", count, env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                                                       "CONSENT_LEDGER_DATA_DIR": str(tmp_path)}, timeout=30)
        line = one_line_reason(result)
        assert "909,091" in line and "test-range" in line and result.returncode == 2


async def test_ctrl_c_stops_a_long_demo_at_once_with_one_line(database, tmp_path):
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_LEDGER_")}
    env.update({"DATABASE_URL": database.owner_dsn, "CONSENT_LEDGER_DATA_DIR": str(tmp_path),
                "CONSENT_LEDGER_LOG_LEVEL": "warning", "CONSENT_LEDGER_PROGRESS_SECONDS": "0.2"})
    errors = tmp_path / "stderr"
    with errors.open("w") as sink:
        # As from a terminal: a runner started in the background may have left SIGINT ignored, which the
        # command would inherit and never see the Ctrl-C this test sends.
        process = subprocess.Popen([*_command(), "demo", "--patients", "200000"], env=env, stdout=subprocess.PIPE,
                                   stderr=sink, text=True, stdin=subprocess.DEVNULL,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            while "demo: " not in errors.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, errors.read_text()
                time.sleep(0.1)
            assert "patients/s" in errors.read_text(), errors.read_text()  # it is writing, with progress
            process.send_signal(signal.SIGINT)
            process.wait(timeout=20)
        finally:
            process.kill()
    lines = errors.read_text().strip().splitlines()
    assert process.returncode == 130, errors.read_text()[-2000:]
    assert lines[-1].startswith("consent-ledger: interrupted") and "run again" in lines[-1]
    assert "Traceback" not in errors.read_text() and "CancelledError" not in errors.read_text()
    conn = await database.connect_owner()
    try:
        assert (await verify_database(conn)).failure is None  # whatever it wrote is whole
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


async def test_a_second_server_on_a_busy_port_says_so_before_starting_and_the_first_logs_its_life(
        database, signing_key, tmp_path):
    """A second `serve` used to log "serving ... port" and only then die with
    'OSError: [Errno 98]'; nothing was logged on shutdown."""
    import asyncio

    from conftest import AUDIENCE, ISSUER
    from live_server import LiveServer

    first = LiveServer(database_url=database.owner_dsn, signing_key=signing_key, issuer=ISSUER, audience=AUDIENCE,
                       workdir=tmp_path)
    try:
        await asyncio.to_thread(first.wait_ready)
        second = run("serve", "--port", str(first.port),
                     env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",  # never reached: the port is checked first
                          "CONSENT_LEDGER_DATA_DIR": str(tmp_path / "second")}, timeout=30)
    finally:
        log = first.stop()
    line = one_line_reason(second)
    assert f"127.0.0.1:{first.port} is already in use" in line and "--port" in line and "doctor" in line
    assert "serving" not in second.stderr
    events = [json.loads(raw) for raw in log.splitlines() if raw.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("serving") < names.index("stopped")
    assert next(e for e in events if e["event"] == "serving")["url"] == f"http://127.0.0.1:{first.port}"


def test_embedded_database_urls_are_logged_readably():
    from service.store.database import describe

    assert describe("postgresql://postgres:@/consent_ledger?host=/tmp/x/pgdata") == \
        "postgresql:///consent_ledger (socket in /tmp/x/pgdata)"
    assert describe("postgresql://u:secret@db.example:5433/ledger") == "postgresql://db.example:5433/ledger"


def test_a_postgres_left_by_a_killed_command_is_listed_and_then_stopped(tmp_path):
    """Killing a command used to leave the embedded PostgreSQL running (parent
    PID 1) for ever: later commands did not stop it.  Now `doctor` lists it
    with the command that stops it, and the next command takes it over and
    stops it when it ends.  Also: no platformdirs warning without XDG_RUNTIME_DIR."""
    import signal
    import time
    import urllib.request

    import psutil

    from live_server import free_port
    from service.store.database import running_postmaster

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CONSENT_LEDGER_") and k not in ("DATABASE_URL", "XDG_RUNTIME_DIR")}
    env["CONSENT_LEDGER_DATA_DIR"] = str(tmp_path / "data")
    pgdata = tmp_path / "data" / "pgdata"
    port = free_port()
    errors = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*_command(), "serve", "--port", str(port)], env=env, stdout=errors, stderr=errors,
                              stdin=subprocess.DEVNULL)
    postmaster = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        postmaster = running_postmaster(pgdata)
        assert postmaster is not None and postmaster.holders == (server.pid,)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert psutil.pid_exists(postmaster.pid)  # left behind, as before

        doctor = subprocess.run([*_command(), "doctor", "--url", f"http://127.0.0.1:{port}"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert doctor.returncode == 1, doctor.stdout
        stray = [line for line in doctor.stdout.splitlines() if line.startswith("FAIL  stray PostgreSQL")]
        assert stray and f"pid {postmaster.pid} runs on this data directory" in stray[0], doctor.stdout
        assert f"kill -INT {postmaster.pid}" in stray[0] and str(server.pid) in stray[0]

        later = subprocess.run([*_command(), "migrate"], env=env, capture_output=True, text=True, timeout=60)
        assert later.returncode == 0, later.stderr
        assert "takes it over" in later.stderr
        deadline = time.monotonic() + 30
        while psutil.pid_exists(postmaster.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil.pid_exists(postmaster.pid)
        for output in (doctor.stderr, later.stderr, (tmp_path / "serve.log").read_text()):
            assert "RuntimeDirWarning" not in output and "XDG_RUNTIME_DIR" not in output
        started = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()
                   if line.startswith("{")]
        database_line = next(e for e in started if e["event"].startswith("database"))
        assert "host=" not in database_line["url"] and database_line["data"] == str(pgdata)
        auth_line = next(e for e in started if e["event"].startswith("DEVELOPMENT AUTH"))
        assert auth_line["key_file"] == str(tmp_path / "data" / DEV_KEY_FILE)
    finally:
        server.kill()
        errors.close()
        if postmaster is not None and psutil.pid_exists(postmaster.pid):
            os.kill(postmaster.pid, signal.SIGINT)


@pytest.mark.parametrize(("key", "said"), [
    ("nonsense", "neither a verifier key"),  # used to be "[Errno 2] No such file or directory: 'nonsense'"
    ("", "--key is empty"),  # what KEY=$(curl ...) gives when curl fails; used to be "[Errno 21] Is a directory: '.'"
    ("a+b+c", "does not hold a verifier key"),
])
def test_verify_explains_a_bad_key(tmp_path, key, said):
    line = one_line_reason(run("verify", "--url", "http://127.0.0.1:1", "--key", key,
                               env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path)}))
    assert said in line and "Errno" not in line and "/v1/log-key" in line


def test_verify_against_nothing_says_nothing_answers(tmp_path):
    from contracts.note import Signer
    from live_server import free_port

    port = free_port()
    vkey = Signer.generate("consent-ledger.example/log").verifier.vkey
    line = one_line_reason(run("verify", "--url", f"http://127.0.0.1:{port}", "--key", vkey,
                               env={"CONSENT_LEDGER_DATA_DIR": str(tmp_path)}))
    assert f"nothing answers at http://127.0.0.1:{port}" in line and "consent-ledger serve" in line


def test_witness_failures_are_one_line_too(tmp_path):
    env = {"CONSENT_LEDGER_DATA_DIR": str(tmp_path)}
    line = one_line_reason(run("witness", "serve", "--key", str(tmp_path / "none"), "--log", "x", env=env))
    assert "--log" in line and "witness serve --help" in line
    vkey = "consent-ledger.example/log+d5d09517+AWENtnBAsw3mRpmFrJwk3W6UYfFds5GzHTj2obNzYlch"
    line = one_line_reason(run("witness", "serve", "--key", str(tmp_path / "none"),
                               "--log", f"consent-ledger.example/log:{vkey}", env=env))
    assert "cannot read the witness key" in line and "No such file" in line and "Errno" not in line
