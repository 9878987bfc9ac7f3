"""deploy/ is checked without a container engine: the compose file parses and
wires the PostgreSQL primary and its streaming replica, the migration, two
service instances and the proxy together as documented, and every command
the image and compose file run is one the CLI really has — the same ones the
README tells people to run.  (deploy/kubernetes: tests/test_kubernetes.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from deploy_reference import (DEPLOY, READ_REPLICA_VARIABLE, ROOT, config_variables, documented_provisioning,
                              sql_statements, undocumented_settings)
from service.cli.main import parser
from service.store.migrations import APP_ROLE

INSTANCES = ("consent-ledger-1", "consent-ledger-2")
POSTGRES = ("postgres", "postgres-replica")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[str]]:
    """Instructions by keyword, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.setdefault(keyword.upper(), []).append(rest.strip())
    return out


def _exec_form(value: str) -> list[str]:
    return json.loads(value)


def _readme_commands() -> list[list[str]]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README opens with a sh block of commands"
    return [shlex.split(part) for line in block.group(1).splitlines() for part in line.split("&&")]


def test_compose_wires_primary_replica_migration_instances_and_proxy(compose: dict):
    services = compose["services"]
    assert set(services) == {*POSTGRES, "migrate", *INSTANCES, "proxy"}
    for name, volume in zip(POSTGRES, ("pgdata", "pgdata-replica")):
        assert services[name]["image"].startswith("postgres:16")
        assert f"{volume}:/var/lib/postgresql/data" in services[name]["volumes"] and volume in compose["volumes"]

    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    for svc in (migrate, *(services[i] for i in INSTANCES)):
        env = svc["environment"]
        assert env["CONSENT_LEDGER_ENV"] == "production"
        assert env["DATABASE_URL"].startswith("postgresql://consent_ledger_owner:")
        assert env["DATABASE_URL"].endswith("@postgres:5432/consent_ledger")
        mounted = {v.split(":")[1]: v for v in svc["volumes"]}
        assert env["CONSENT_LEDGER_JWKS"] in mounted and mounted[env["CONSENT_LEDGER_JWKS"]].endswith(":ro")
    assert "CONSENT_LEDGER_SERVICE_DATABASE_URL" not in migrate["environment"]
    for name in INSTANCES:
        app = services[name]
        assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        env = app["environment"]
        # The service's pool logs in as the NOINHERIT service role, not the owner; reads go to the replica.
        for variable, host in (("CONSENT_LEDGER_SERVICE_DATABASE_URL", "postgres"),
                               (READ_REPLICA_VARIABLE, "postgres-replica")):
            assert env[variable].startswith("postgresql://consent_ledger_service:")
            assert env[variable].endswith(f"@{host}:5432/consent_ledger")
        # Both instances sign the same log, so with the same mounted key.
        mounted = {v.split(":")[1]: v for v in app["volumes"]}
        assert mounted[env["CONSENT_LEDGER_LOG_KEY"]] == "./log.key:/run/consent-ledger/log.key:ro"
        assert "ports" not in app, "instances are reached through the proxy"
    # Published on loopback only: exposing it is a deliberate operator choice.
    assert services["proxy"]["ports"] == ["127.0.0.1:8080:8080"]


def test_every_variable_compose_sets_is_one_the_service_reads(compose: dict):
    known = config_variables() | {READ_REPLICA_VARIABLE}
    for name in ("migrate", *INSTANCES):
        unknown = set(compose["services"][name]["environment"]) - known
        assert not unknown, f"{name} sets variables service/config.py does not read: {unknown}"


def test_compose_postgres_is_durable_and_documented(compose: dict):
    primary, replica = (compose["services"][name]["command"] for name in POSTGRES)
    # One list for both: a hot standby needs some settings at least the primary's, and may become the primary.
    assert primary == replica
    settings = dict(arg.split("=", 1) for arg in primary[2::2])
    assert primary[0] == "postgres" and set(primary[1::2]) == {"-c"}
    assert settings["fsync"] == "on" and settings["synchronous_commit"] == "on"
    assert settings["full_page_writes"] == "on" and settings["wal_level"] == "replica"
    undocumented = undocumented_settings(list(settings))
    assert not undocumented, f"settings used in compose.yaml but not explained in POSTGRES.md: {undocumented}"


def _heredoc_sql(script: str) -> list[str]:
    return sql_statements(script[script.index("<<'SQL'") + len("<<'SQL'"):script.rindex("SQL")])


def test_init_script_provisions_the_documented_roles(compose: dict):
    script = (DEPLOY / "postgres-init.sh").read_text()
    statements = _heredoc_sql(script)
    assert f"CREATE ROLE {APP_ROLE} NOLOGIN" in statements
    assert ("CREATE ROLE consent_ledger_service LOGIN NOINHERIT PASSWORD :'service_password' "
            f"IN ROLE {APP_ROLE}") in statements
    assert "CREATE DATABASE consent_ledger OWNER consent_ledger_owner" in statements
    assert "SUPERUSER" not in script and "CREATEROLE" not in script
    # The same provisioning as deploy/POSTGRES-ROLES.md, statement for statement.
    assert statements == documented_provisioning()
    mounts = compose["services"]["postgres"]["volumes"]
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-consent-ledger.sh:ro" in mounts


def test_the_replica_clones_the_primary_through_its_slot_as_a_replication_only_login(compose: dict):
    primary, replica = (compose["services"][name] for name in POSTGRES)
    # The primary's second init script (after the roles) makes the login, the slot and the pg_hba rule.
    assert "./postgres-replication.sh:/docker-entrypoint-initdb.d/20-replication.sh:ro" in primary["volumes"]
    script = (DEPLOY / "postgres-replication.sh").read_text()
    create_role, create_slot = _heredoc_sql(script)
    role = re.fullmatch(r"CREATE ROLE (\w+) LOGIN REPLICATION PASSWORD :'replication_password'", create_role)[1]
    slot = re.fullmatch(r"SELECT pg_create_physical_replication_slot\('(\w+)'\)", create_slot)[1]
    assert f'echo "host replication {role} all scram-sha-256" >> "$PGDATA/pg_hba.conf"' in script
    assert 'replication_password="$CONSENT_LEDGER_REPLICATION_PASSWORD"' in script
    assert (primary["environment"]["CONSENT_LEDGER_REPLICATION_PASSWORD"]
            == replica["environment"]["PGPASSWORD"])

    # The replica's entrypoint clones the primary once, then runs the image's own entrypoint.
    (entrypoint,) = replica["entrypoint"]
    assert f"./postgres-replica.sh:{entrypoint}:ro" in replica["volumes"]
    assert os.access(DEPLOY / "postgres-replica.sh", os.X_OK)
    clone = re.sub(r"\\\n\s*", " ", (DEPLOY / "postgres-replica.sh").read_text())
    backup = shlex.split(next(line for line in clone.splitlines() if line.strip().startswith("gosu")))
    assert backup[:3] == ["gosu", "postgres", "pg_basebackup"]
    assert {"--host=postgres", f"--username={role}", f"--slot={slot}", "--write-recovery-conf",
            "--wal-method=stream"} <= set(backup)
    assert 'exec docker-entrypoint.sh "$@"' in clone
    assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_proxy_balances_over_the_ready_instances(compose: dict):
    proxy = compose["services"]["proxy"]
    assert proxy["image"].startswith("haproxy:")
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]
    assert set(proxy["depends_on"]) == set(INSTANCES)
    config = [line.split() for line in (DEPLOY / "haproxy.cfg").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    servers = {words[1]: words[2] for words in config if words[0] == "server"}
    listening = {}
    for name in INSTANCES:
        args = parser().parse_args(compose["services"][name]["command"][1:])
        listening[name] = f"{name}:{args.port}"
    assert servers == listening
    assert ["bind", ":" + proxy["ports"][0].rsplit(":", 1)[1]] in config
    # Traffic only to instances whose /readyz answers 200.
    assert ["http-check", "send", "meth", "GET", "uri", "/readyz"] in config
    assert ["http-check", "expect", "status", "200"] in config
    assert next(words for words in config if words[0] == "default-server")[1] == "check"


def test_dockerfile_runs_the_readme_service_as_non_root(dockerfile: dict[str, list[str]]):
    assert dockerfile["FROM"] == ["python:3.11-slim"]
    user = dockerfile["USER"][-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    cmd = _exec_form(dockerfile["CMD"][-1])
    readme = _readme_commands()
    readme_serve = next(c for c in readme if c[0].endswith("consent-ledger") and c[1:2] == ["serve"])
    assert Path(readme_serve[0]).name == cmd[0] and cmd[1] == readme_serve[1] == "serve"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    readme_install = next(c for c in readme if "pip" in c[0] and "install" in c)
    image_install = next(r for r in dockerfile["RUN"] if "pip install" in r)
    # Same install as the README minus the editable flag: an image has no checkout.
    assert readme_install[-1] == "." and re.search(r"pip install \.( |$)", image_install)
    healthcheck = dockerfile["HEALTHCHECK"][-1]
    assert "/readyz" in healthcheck and "--interval" in healthcheck


@pytest.mark.parametrize("where", ["dockerfile", "migrate", *INSTANCES])
def test_every_deployed_command_is_a_real_cli_command(where: str, compose: dict,
                                                      dockerfile: dict[str, list[str]]):
    cmd = _exec_form(dockerfile["CMD"][-1]) if where == "dockerfile" else compose["services"][where]["command"]
    assert cmd[0] == "consent-ledger"
    args = parser().parse_args(cmd[1:])  # exits (fails the test) on an unknown command or option
    assert args.command == ("migrate" if where == "migrate" else "serve")


def test_image_never_contains_local_secrets_or_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".consent-ledger", "deploy/jwks.json", "deploy/log.key"):
        assert path in ignored
    # The log's private key is never committed either.
    assert "deploy/log.key" in (ROOT / ".gitignore").read_text().split()
