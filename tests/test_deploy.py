"""deploy/ is checked without a container engine: the compose file parses and
wires PostgreSQL, migration and service together as documented, and every
command the image and compose file run is one the CLI really has — the same
ones the README tells people to run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.cli import parser
from service.schema import APP_ROLE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


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


def test_compose_wires_postgres_migration_and_service(compose: dict):
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "consent-ledger"}
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:16")
    assert any(v.startswith("pgdata:") for v in pg["volumes"]) and "pgdata" in compose["volumes"]

    migrate, app = services["migrate"], services["consent-ledger"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for svc in (migrate, app):
        env = svc["environment"]
        assert env["CONSENT_LEDGER_ENV"] == "production"
        assert env["DATABASE_URL"].startswith("postgresql://consent_ledger_owner:")
        assert env["DATABASE_URL"].endswith("@postgres:5432/consent_ledger")
        mounted = {v.split(":")[1]: v for v in svc["volumes"]}
        assert env["CONSENT_LEDGER_JWKS"] in mounted and mounted[env["CONSENT_LEDGER_JWKS"]].endswith(":ro")
    # The service's pool logs in as the NOINHERIT service role, not the owner.
    service_url = app["environment"]["CONSENT_LEDGER_SERVICE_DATABASE_URL"]
    assert service_url.startswith("postgresql://consent_ledger_service:")
    assert service_url.endswith("@postgres:5432/consent_ledger")
    assert "CONSENT_LEDGER_SERVICE_DATABASE_URL" not in migrate["environment"]
    # Published on loopback only: exposing it is a deliberate operator choice.
    assert app["ports"] == ["127.0.0.1:8080:8080"]


def test_compose_postgres_is_durable_and_documented(compose: dict):
    command = compose["services"]["postgres"]["command"]
    settings = dict(arg.split("=", 1) for arg in command[2::2])
    assert command[0] == "postgres" and set(command[1::2]) == {"-c"}
    assert settings["fsync"] == "on" and settings["synchronous_commit"] == "on"
    assert settings["full_page_writes"] == "on"
    notes = (DEPLOY / "POSTGRES.md").read_text()
    undocumented = [name for name in settings if f"`{name}" not in notes]
    assert not undocumented, f"settings used in compose.yaml but not explained in POSTGRES.md: {undocumented}"


def _sql(text: str) -> list[str]:
    return [" ".join(stmt.split()) for stmt in text.split(";") if stmt.strip()]


def test_init_script_provisions_the_documented_roles(compose: dict):
    script = (DEPLOY / "postgres-init.sh").read_text()
    body = script[script.index("<<'SQL'") + len("<<'SQL'"):script.rindex("SQL")]
    statements = _sql(body)
    assert f"CREATE ROLE {APP_ROLE} NOLOGIN" in statements
    assert ("CREATE ROLE consent_ledger_service LOGIN NOINHERIT PASSWORD :'service_password' "
            f"IN ROLE {APP_ROLE}") in statements
    assert "CREATE DATABASE consent_ledger OWNER consent_ledger_owner" in statements
    assert "SUPERUSER" not in script and "CREATEROLE" not in script
    # The same provisioning as deploy/POSTGRES-ROLES.md, statement for statement.
    documented = (DEPLOY / "POSTGRES-ROLES.md").read_text()
    block = re.search(r"```sql\n(.*?)```", documented, re.S)
    assert block
    doc_statements = _sql("\n".join(line.split("--")[0] for line in block.group(1).splitlines()))
    assert statements == doc_statements
    mounts = compose["services"]["postgres"]["volumes"]
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-consent-ledger.sh:ro" in mounts


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


@pytest.mark.parametrize("where", ["dockerfile", "migrate", "consent-ledger"])
def test_every_deployed_command_is_a_real_cli_command(where: str, compose: dict,
                                                      dockerfile: dict[str, list[str]]):
    cmd = _exec_form(dockerfile["CMD"][-1]) if where == "dockerfile" else compose["services"][where]["command"]
    assert cmd[0] == "consent-ledger"
    args = parser().parse_args(cmd[1:])  # exits (fails the test) on an unknown command or option
    assert args.command == {"dockerfile": "serve", "migrate": "migrate", "consent-ledger": "serve"}[where]


def test_image_never_contains_local_secrets_or_state():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".consent-ledger", "deploy/jwks.json"):
        assert path in ignored
